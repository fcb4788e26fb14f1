package clusterconnect

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	v1 "github.com/clusterconnect/clusterconnect/clients/go/clusterconnectv1"
)

// maxChunk bounds one Chunk's payload: the relay and the agent read sockets in blocks of this size.
const maxChunk = 256 << 10

// Addr names one end of a tunnelled connection: the cluster, reached through the relay.
type Addr struct {
	Cluster string
}

// Network is "clusterconnect".
func (Addr) Network() string { return "clusterconnect" }

func (a Addr) String() string { return "cluster/" + a.Cluster }

// TunnelError is a Dial the relay refused or a tunnel that broke: the relay's gRPC status
// (status.FromError and status.Code see it) and the cluster it was for.
type TunnelError struct {
	Cluster string
	Status  *status.Status
}

func (e *TunnelError) Error() string {
	return fmt.Sprintf("clusterconnect: cluster %s: %s (%s)", e.Cluster, e.Status.Message(), e.Status.Code())
}

// GRPCStatus makes the relay's status visible to status.FromError and status.Code.
func (e *TunnelError) GRPCStatus() *status.Status { return e.Status }

type received struct {
	data []byte
	err  error // io.EOF: the cluster finished sending; else why the tunnel ended
}

// conn is a net.Conn over one open ClientTunnel.Dial stream. Reads come from its receiver goroutine
// (started by newConn, ended by the stream's end; Close cancels the stream and waits for it), writes
// are sent by the writing goroutine itself.
type conn struct {
	cluster string
	stream  grpc.BidiStreamingClient[v1.Chunk, v1.Chunk]
	cancel  context.CancelFunc

	incoming chan received // from the receiver; its last item carries an error
	finished chan struct{} // the receiver saw the stream's end; then final holds its status
	final    error         // nil: the stream ended with OK
	closed   chan struct{}
	close    sync.Once

	readMu  sync.Mutex
	pending []byte
	readErr error // sticky once seen

	writeMu     sync.Mutex
	writeClosed bool

	readDeadline, writeDeadline *deadline
}

func newConn(cluster string, stream grpc.BidiStreamingClient[v1.Chunk, v1.Chunk], cancel context.CancelFunc) *conn {
	c := &conn{
		cluster: cluster, stream: stream, cancel: cancel,
		incoming: make(chan received), finished: make(chan struct{}), closed: make(chan struct{}),
		readDeadline: newDeadline(), writeDeadline: newDeadline(),
	}
	go c.receive()
	return c
}

// receive moves Chunks to Read until the stream ends, and keeps the stream's final status for Write.
func (c *conn) receive() {
	defer close(c.finished)
	defer c.cancel() // the stream ended: release its context even if Close is never called
	readsOpen := true
	deliver := func(item received) {
		select {
		case c.incoming <- item:
		case <-c.closed: // nobody reads any more; Recv fails next, as Close cancelled the stream
		}
	}
	for {
		chunk, err := c.stream.Recv()
		if err != nil {
			if err != io.EOF {
				c.final = c.tunnelError(err)
			}
			if readsOpen {
				if c.final == nil {
					deliver(received{err: io.EOF})
				} else {
					deliver(received{err: c.final})
				}
			}
			return
		}
		if !readsOpen {
			continue // after Chunk{eof} only the status is awaited
		}
		if chunk.GetEof() {
			readsOpen = false
			deliver(received{err: io.EOF})
			continue
		}
		if len(chunk.GetData()) > 0 {
			deliver(received{data: chunk.GetData()})
		}
	}
}

func (c *conn) tunnelError(err error) error {
	if isClosed(c.closed) {
		return net.ErrClosed
	}
	if s, ok := status.FromError(err); ok {
		return &TunnelError{Cluster: c.cluster, Status: s}
	}
	return err
}

// Read returns the cluster's bytes in order; io.EOF once the cluster finished sending.
func (c *conn) Read(b []byte) (int, error) {
	c.readMu.Lock()
	defer c.readMu.Unlock()
	for len(c.pending) == 0 {
		if c.readErr != nil {
			return 0, c.readErr
		}
		if isClosed(c.closed) {
			return 0, net.ErrClosed
		}
		if isClosed(c.readDeadline.wait()) {
			return 0, os.ErrDeadlineExceeded
		}
		select {
		case item := <-c.incoming:
			c.pending, c.readErr = item.data, item.err
		case <-c.closed:
		case <-c.readDeadline.wait():
		}
	}
	n := copy(b, c.pending)
	c.pending = c.pending[n:]
	return n, nil
}

// Write sends b as Chunks of at most maxChunk. The write deadline is checked before each Chunk; a
// Chunk that waits for the relay's flow control window is not interrupted by it.
func (c *conn) Write(b []byte) (int, error) {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	written := 0
	for {
		switch {
		case isClosed(c.closed):
			return written, net.ErrClosed
		case c.writeClosed:
			return written, errors.New("clusterconnect: write after CloseWrite")
		case isClosed(c.writeDeadline.wait()):
			return written, os.ErrDeadlineExceeded
		case len(b) == 0:
			return written, nil
		}
		piece := b[:min(len(b), maxChunk)]
		if err := c.stream.Send(&v1.Chunk{Data: piece}); err != nil {
			return written, c.sendError(err)
		}
		written += len(piece)
		b = b[len(piece):]
	}
}

// sendError: Send says only io.EOF when the stream ended; the receiver has the status.
func (c *conn) sendError(err error) error {
	if err != io.EOF {
		return c.tunnelError(err)
	}
	select {
	case <-c.finished:
	case <-c.closed:
		return net.ErrClosed
	}
	if c.final != nil {
		return c.final
	}
	return &TunnelError{Cluster: c.cluster, Status: status.New(codes.Unavailable, "the tunnel was closed")}
}

// CloseWrite half-closes the connection (the cluster's side reads EOF); reads go on.
func (c *conn) CloseWrite() error {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	if isClosed(c.closed) {
		return net.ErrClosed
	}
	if c.writeClosed {
		return nil
	}
	c.writeClosed = true
	return c.stream.CloseSend()
}

// Close cancels the stream, which aborts the connection at the far end, and waits for the receiver.
func (c *conn) Close() error {
	c.close.Do(func() {
		close(c.closed)
		c.cancel()
	})
	<-c.finished
	return nil
}

func (c *conn) LocalAddr() net.Addr  { return Addr{Cluster: c.cluster} }
func (c *conn) RemoteAddr() net.Addr { return Addr{Cluster: c.cluster} }

func (c *conn) SetDeadline(t time.Time) error {
	c.readDeadline.set(t)
	c.writeDeadline.set(t)
	return nil
}

func (c *conn) SetReadDeadline(t time.Time) error {
	c.readDeadline.set(t)
	return nil
}

func (c *conn) SetWriteDeadline(t time.Time) error {
	c.writeDeadline.set(t)
	return nil
}
