//go:build tools

// Package tools pins the Go code generators for clients/go (protoc-gen-go and protoc-gen-go-grpc)
// to the versions in go.mod; `make go-protos` builds them from source into tools/bin/.
package tools

import (
	_ "google.golang.org/grpc/cmd/protoc-gen-go-grpc"
	_ "google.golang.org/protobuf/cmd/protoc-gen-go"
)
