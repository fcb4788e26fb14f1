package clusterconnect

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// ConnectRelay returns a gRPC client connection to the relay's main port. address is "host:port" or
// "https://host:port" (as `clusterconnect proxy --relay` takes it); caFile is a PEM bundle the
// relay's certificate must chain to, or "" for the system's roots. Every Dial on it shares one
// HTTP/2 connection; close it when done.
func ConnectRelay(address, caFile string, options ...grpc.DialOption) (*grpc.ClientConn, error) {
	config := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("clusterconnect: reading the relay CA: %w", err)
		}
		config.RootCAs = x509.NewCertPool()
		if !config.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("clusterconnect: no certificate in %s", caFile)
		}
	}
	target := strings.TrimSuffix(strings.TrimPrefix(address, "https://"), "/")
	options = append([]grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(config))}, options...)
	return grpc.NewClient(target, options...)
}
