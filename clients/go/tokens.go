package clusterconnect

import (
	"context"
	"fmt"
	"os"
	"strings"
)

// A TokenSource gives the bearer token for each new connection: the relay checks it on Dial and the
// cluster (through the auth proxy) on every request.
type TokenSource interface {
	Token(ctx context.Context) (string, error)
}

// StaticToken is a token that never changes.
type StaticToken string

// Token returns the token itself.
func (t StaticToken) Token(context.Context) (string, error) { return string(t), nil }

// TokenFile is the path of a file holding the token, read again for every connection so a rotated
// token (a projected ServiceAccount token, `clusterconnect token > file`) is picked up.
type TokenFile string

// Token reads the file; surrounding white space is not part of the token.
func (f TokenFile) Token(context.Context) (string, error) {
	data, err := os.ReadFile(string(f))
	if err != nil {
		return "", fmt.Errorf("clusterconnect: reading the token: %w", err)
	}
	token := strings.TrimSpace(string(data))
	if token == "" {
		return "", fmt.Errorf("clusterconnect: token file %s is empty", string(f))
	}
	return token, nil
}
