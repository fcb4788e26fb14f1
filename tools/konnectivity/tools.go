//go:build tools

// Konnectivity (apiserver-network-proxy) server and agent, the benchmark's peer (issue #15), built from
// source at the version pinned in go.mod by `make -C tools/konnectivity`, never downloaded.
package tools

import (
	_ "sigs.k8s.io/apiserver-network-proxy/cmd/agent"
	_ "sigs.k8s.io/apiserver-network-proxy/cmd/server"
)
