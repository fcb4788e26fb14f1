package clusterconnect

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	v1 "github.com/clusterconnect/clusterconnect/clients/go/clusterconnectv1"
)

// A relay of the test's own: each Dial stream runs serve, on a real gRPC server on 127.0.0.1.
type fakeRelay struct {
	v1.UnimplementedClientTunnelServer
	serve func(grpc.BidiStreamingServer[v1.Chunk, v1.Chunk]) error
}

func (f *fakeRelay) Dial(stream grpc.BidiStreamingServer[v1.Chunk, v1.Chunk]) error {
	return f.serve(stream)
}

func startRelay(t *testing.T, serve func(grpc.BidiStreamingServer[v1.Chunk, v1.Chunk]) error) *grpc.ClientConn {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	v1.RegisterClientTunnelServer(server, &fakeRelay{serve: serve})
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = server.Serve(listener)
	}()
	client, err := grpc.NewClient(listener.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = client.Close()
		server.Stop()
		<-served
	})
	return client
}

func open(stream grpc.BidiStreamingServer[v1.Chunk, v1.Chunk]) error {
	return stream.SendHeader(metadata.Pairs(openMetadata, "1"))
}

func within(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestRefusalCarriesTheRelaysStatus(t *testing.T) {
	relay := startRelay(t, func(grpc.BidiStreamingServer[v1.Chunk, v1.Chunk]) error {
		return status.Error(codes.NotFound, "cluster prod is not registered")
	})
	_, err := Dial(within(t), relay, "prod", StaticToken("t"))
	if status.Code(err) != codes.NotFound || !strings.Contains(err.Error(), "cluster prod is not registered") {
		t.Fatalf("want the relay's NOT_FOUND, got %v", err)
	}
	var tunnelErr *TunnelError
	if !errors.As(err, &tunnelErr) || tunnelErr.Cluster != "prod" {
		t.Fatalf("want a *TunnelError for prod, got %#v", err)
	}
}

// Bytes both ways, the client's half-close (CloseSend) and the relay's Chunk{eof} (io.EOF).
func TestHalfCloseAndEOF(t *testing.T) {
	type seen struct{ cluster, authorization []string }
	got := make(chan seen, 1)
	relay := startRelay(t, func(stream grpc.BidiStreamingServer[v1.Chunk, v1.Chunk]) error {
		md, _ := metadata.FromIncomingContext(stream.Context())
		got <- seen{md.Get(clusterMetadata), md.Get("authorization")}
		if err := open(stream); err != nil {
			return err
		}
		var request bytes.Buffer
		for {
			chunk, err := stream.Recv()
			if err == io.EOF {
				break // the client's CloseWrite
			}
			if err != nil {
				return err
			}
			request.Write(chunk.GetData())
		}
		answer := strings.ToUpper(request.String())
		if err := stream.Send(&v1.Chunk{Data: []byte(answer)}); err != nil {
			return err
		}
		if err := stream.Send(&v1.Chunk{Eof: true}); err != nil {
			return err
		}
		<-stream.Context().Done() // the stream stays open: Chunk{eof} alone must end the reads
		return nil
	})
	conn, err := Dial(within(t), relay, "prod", StaticToken("secret"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if s := <-got; strings.Join(s.cluster, ",") != "prod" || strings.Join(s.authorization, ",") != "Bearer secret" {
		t.Fatalf("metadata: %+v", s)
	}
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second)) // a failure, not a hang
	big := bytes.Repeat([]byte("abcdefgh"), maxChunk/4)    // two Chunks
	if n, err := conn.Write(big); err != nil || n != len(big) {
		t.Fatalf("write: %d %v", n, err)
	}
	if err := conn.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	answer, err := io.ReadAll(conn) // ends only at io.EOF
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(answer, bytes.ToUpper(big)) {
		t.Fatalf("got %d bytes back, want %d", len(answer), len(big))
	}
	if _, err := conn.Write([]byte("x")); err == nil {
		t.Fatal("a write after CloseWrite succeeded")
	}
}

func TestBrokenTunnelReadsTheStatus(t *testing.T) {
	relay := startRelay(t, func(stream grpc.BidiStreamingServer[v1.Chunk, v1.Chunk]) error {
		if err := open(stream); err != nil {
			return err
		}
		if err := stream.Send(&v1.Chunk{Data: []byte("partial")}); err != nil {
			return err
		}
		return status.Error(codes.Unavailable, "connection to cluster prod lost")
	})
	conn, err := Dial(within(t), relay, "prod", StaticToken("t"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	data, err := io.ReadAll(conn)
	if string(data) != "partial" || status.Code(err) != codes.Unavailable {
		t.Fatalf("want the data, then UNAVAILABLE; got %q, %v", data, err)
	}
	if _, err := conn.Write([]byte("more")); status.Code(err) != codes.Unavailable {
		t.Fatalf("a write after the tunnel broke: want UNAVAILABLE, got %v", err)
	}
}

func TestReadDeadline(t *testing.T) {
	relay := startRelay(t, func(stream grpc.BidiStreamingServer[v1.Chunk, v1.Chunk]) error {
		if err := open(stream); err != nil {
			return err
		}
		if _, err := stream.Recv(); err != nil { // answers only when asked
			return err
		}
		if err := stream.Send(&v1.Chunk{Data: []byte("late")}); err != nil {
			return err
		}
		<-stream.Context().Done()
		return nil
	})
	conn, err := Dial(within(t), relay, "prod", StaticToken("t"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	buffer := make([]byte, 16)
	if err := returnsWithin(t, func() error { _, err := conn.Read(buffer); return err }); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("want a deadline error, got %v", err)
	}
	// The connection still works once the deadline is lifted.
	_ = conn.SetReadDeadline(time.Time{})
	if _, err := conn.Write([]byte("go")); err != nil {
		t.Fatal(err)
	}
	n, err := conn.Read(buffer)
	if err != nil || string(buffer[:n]) != "late" {
		t.Fatalf("got %q, %v", buffer[:n], err)
	}
}

// Close cancels the stream: the relay sees its Dial end.
func TestCloseCancelsTheStream(t *testing.T) {
	ended := make(chan error, 1)
	relay := startRelay(t, func(stream grpc.BidiStreamingServer[v1.Chunk, v1.Chunk]) error {
		if err := open(stream); err != nil {
			return err
		}
		_, err := stream.Recv()
		ended <- err
		return nil
	})
	conn, err := Dial(within(t), relay, "prod", StaticToken("t"))
	if err != nil {
		t.Fatal(err)
	}
	if err := returnsWithin(t, conn.Close); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-ended:
		if status.Code(err) != codes.Canceled {
			t.Fatalf("the relay's Recv: want CANCELLED, got %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the relay's stream did not end after Close")
	}
	if _, err := conn.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("read after Close: want net.ErrClosed, got %v", err)
	}
}

// ctx bounds the opening: a relay that never says "open" makes Dial fail with ctx's error, and the
// stream is cancelled.
func TestDialContextBoundsTheOpening(t *testing.T) {
	ended := make(chan struct{})
	relay := startRelay(t, func(stream grpc.BidiStreamingServer[v1.Chunk, v1.Chunk]) error {
		<-stream.Context().Done()
		close(ended)
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := Dial(ctx, relay, "prod", StaticToken("t")); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("want context.DeadlineExceeded, got %v", err)
	}
	select {
	case <-ended:
	case <-time.After(10 * time.Second):
		t.Fatal("the stream was not cancelled")
	}
}

// returnsWithin runs call and fails the test if it has not returned within 10 s (instead of hanging).
func returnsWithin(t *testing.T, call func() error) error {
	t.Helper()
	result := make(chan error, 1)
	go func() { result <- call() }()
	select {
	case err := <-result:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("did not return within 10s")
		return nil
	}
}
