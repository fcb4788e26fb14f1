package clusterconnect

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"weak"

	"golang.org/x/net/proxy"
	"google.golang.org/grpc"
	"k8s.io/client-go/rest"
)

// DialTimeout bounds the opening of each connection RESTConfig makes (the relay itself answers
// within seconds: its agent accepted, or why not).
const DialTimeout = 30 * time.Second

// RESTConfig is a client-go configuration whose every connection is a Dial through the relay to the
// cluster, with the token source's bearer token on each request: clientsets, watches, and exec and
// port-forward over WebSocket (remotecommand.NewWebSocketExecutor, portforward.
// NewSPDYOverWebsocketDialer). SPDY upgrades are not carried: client-go dials those itself.
func RESTConfig(relay grpc.ClientConnInterface, cluster string, tokens TokenSource) *rest.Config {
	d := &tunnelDialer{relay: relay, cluster: cluster, tokens: tokens}
	viaTunnel := &url.URL{Scheme: tunnelScheme, Host: registerDialer(d)}
	return &rest.Config{
		// The host name is only the Host header's: the tunnel decides where the bytes go.
		Host: "http://" + cluster,
		Dial: d.DialContext,
		// client-go's WebSocket dialer ignores Dial but honours a proxy: the tunnel is one
		// (registered with golang.org/x/net/proxy). Other requests go direct, i.e. through Dial.
		Proxy: func(request *http.Request) (*url.URL, error) {
			if strings.EqualFold(request.Header.Get("Upgrade"), "websocket") {
				return viaTunnel, nil
			}
			return nil, nil
		},
		WrapTransport: func(next http.RoundTripper) http.RoundTripper {
			return &bearer{tokens: tokens, next: next}
		},
	}
}

type tunnelDialer struct {
	relay   grpc.ClientConnInterface
	cluster string
	tokens  TokenSource
}

func (d *tunnelDialer) DialContext(ctx context.Context, _, _ string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, DialTimeout)
	defer cancel()
	return Dial(ctx, d.relay, d.cluster, d.tokens)
}

func (d *tunnelDialer) Dial(network, address string) (net.Conn, error) {
	return d.DialContext(context.Background(), network, address)
}

// bearer puts the token source's token on every request that has no Authorization header.
type bearer struct {
	tokens TokenSource
	next   http.RoundTripper
}

func (b *bearer) RoundTrip(request *http.Request) (*http.Response, error) {
	if request.Header.Get("Authorization") != "" {
		return b.next.RoundTrip(request)
	}
	token, err := b.tokens.Token(request.Context())
	if err != nil {
		return nil, err
	}
	request = request.Clone(request.Context())
	request.Header.Set("Authorization", "Bearer "+token)
	return b.next.RoundTrip(request)
}

// The proxy scheme of the tunnel. Its URLs name a dialer by a number; the registry holds dialers
// weakly, so one is dropped with the last rest.Config that uses it.
const tunnelScheme = "clusterconnect-tunnel"

var (
	dialers    sync.Map // id -> weak.Pointer[tunnelDialer]
	lastDialer atomic.Uint64
)

func init() {
	proxy.RegisterDialerType(tunnelScheme, func(via *url.URL, _ proxy.Dialer) (proxy.Dialer, error) {
		if entry, ok := dialers.Load(via.Host); ok {
			if d := entry.(weak.Pointer[tunnelDialer]).Value(); d != nil {
				return d, nil
			}
		}
		return nil, fmt.Errorf("clusterconnect: no tunnel %s (its rest.Config is gone)", via.Host)
	})
}

func registerDialer(d *tunnelDialer) string {
	id := strconv.FormatUint(lastDialer.Add(1), 10)
	dialers.Store(id, weak.Make(d))
	runtime.AddCleanup(d, func(id string) { dialers.Delete(id) }, id)
	return id
}
