//go:build tools

// Package tools pins buf (lint and breaking-change checks of protos/) to the version in go.mod;
// `make buf` builds it from source into tools/bin/.
package tools

import _ "github.com/bufbuild/buf/cmd/buf"
