package clusterconnect

import (
	"context"
	"fmt"
	"io"
	"net"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	v1 "github.com/clusterconnect/clusterconnect/clients/go/clusterconnectv1"
)

// Metadata of ClientTunnel.Dial (tunnel.proto; common/metadata.py on the relay's side).
const (
	clusterMetadata = "x-clusterconnect-cluster"
	openMetadata    = "x-clusterconnect-open" // initial metadata: the agent accepted, the path is open
)

// Dial opens one connection to the cluster's apiserver (through its auth proxy) via the relay: a
// ClientTunnel.Dial stream with the cluster's name and the token. It returns once the relay said the
// path is open. A refusal is a *TunnelError with the relay's status (PERMISSION_DENIED: unknown
// cluster or not admitted, one answer for both; UNAVAILABLE: agent not connected; UNAUTHENTICATED;
// RESOURCE_EXHAUSTED: the relay's connection limits). ctx bounds only the opening, as with
// net.Dialer.DialContext.
//
// The connection carries plain HTTP/1.1 to the auth proxy. Besides net.Conn it has CloseWrite
// (half-close: the far end reads EOF, reads go on), like *net.TCPConn.
func Dial(ctx context.Context, relay grpc.ClientConnInterface, cluster string, tokens TokenSource) (net.Conn, error) {
	token, err := tokens.Token(ctx)
	if err != nil {
		return nil, err
	}
	// The stream outlives ctx: only Close ends it.
	streamCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	streamCtx = metadata.AppendToOutgoingContext(streamCtx, clusterMetadata, cluster, "authorization", "Bearer "+token)
	stream, err := v1.NewClientTunnelClient(relay).Dial(streamCtx)
	if err != nil {
		cancel()
		return nil, refusal(cluster, err)
	}
	type header struct {
		md  metadata.MD
		err error
	}
	answer := make(chan header, 1)
	go func() {
		md, err := stream.Header()
		answer <- header{md, err}
	}()
	var got header
	select {
	case got = <-answer:
	case <-ctx.Done():
		cancel()
		<-answer // Header returns once the stream is cancelled
		return nil, fmt.Errorf("clusterconnect: dialling cluster %s: %w", cluster, ctx.Err())
	}
	if got.err == nil && len(got.md.Get(openMetadata)) > 0 {
		return newConn(cluster, stream, cancel), nil
	}
	// Refused: the status comes with the stream's end.
	defer cancel()
	if got.err != nil {
		return nil, refusal(cluster, got.err)
	}
	if _, err := stream.Recv(); err != nil && err != io.EOF {
		return nil, refusal(cluster, err)
	}
	return nil, &TunnelError{Cluster: cluster, Status: status.New(codes.Internal,
		"the relay answered without saying the path is open")}
}

func refusal(cluster string, err error) error {
	return &TunnelError{Cluster: cluster, Status: status.Convert(err)}
}
