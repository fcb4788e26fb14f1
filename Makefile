# clusterconnect: `make demo` and `make test` are the two set-up commands (see README).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: venv lint devcluster devcluster-check oidc-provider haproxy test test-fast demo demo-down demo-ha demo-ha-down bench protos check-protos clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version' 
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==26.3
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

devcluster:
	$(MAKE) -C tests/devcluster

# gofmt, go vet and the Go unit tests of the devcluster's node (quick once the devcluster is built).
devcluster-check: devcluster
	$(MAKE) -C tests/devcluster check

# A real OpenID Connect provider (Ory Hydra) for the identity tests.
oidc-provider:
	$(MAKE) -C tests/devcluster/oidc

# Regenerate the committed Python stubs from protos/ (a test fails when they are stale).
protos: venv
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos protos/clusterconnect/v1/tunnel.proto protos/clusterconnect/v1/identity.proto protos/clusterconnect/v1/enrollment.proto protos/clusterconnect/v1/peer.proto

# ruff (the rule set chosen in pyproject.toml) and mypy (strict for common/, aadproxy/ and relay/).
lint: venv
	$(BIN)/ruff check .
	scripts/typecheck-tree
	$(BIN)/mypy

# HAProxy 2.6 (Debian's package) in TCP mode in front of the relay replicas (tests/test_relay_replicas.py, demo-ha).
haproxy:
	@command -v haproxy >/dev/null || { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq haproxy; }

test: venv devcluster devcluster-check oidc-provider helm proto-tools konnectivity haproxy lint
	$(BIN)/python -m pytest -q -ra

# Only the tests that need no devcluster.
test-fast: venv lint
	$(BIN)/python -m pytest -q -ra -m "not devcluster"

demo: venv devcluster helm
	$(BIN)/python deploy/local/demo.py up --state-dir .demo

demo-down:
	@if [ -x $(BIN)/python ]; then $(BIN)/python deploy/local/demo.py down --state-dir .demo; fi

# 3 etcd members, 3 relay replicas behind HAProxy, the agent and a client proxy (docs/replicas.md).
demo-ha: venv devcluster haproxy
	$(BIN)/python deploy/local/demo_ha.py up --state-dir .demo-ha

demo-ha-down:
	@if [ -x $(BIN)/python ]; then $(BIN)/python deploy/local/demo_ha.py down --state-dir .demo-ha; fi

bench: venv devcluster konnectivity
	$(BIN)/python bench/run.py

clean: demo-down demo-ha-down
	rm -rf .demo .demo-ha tests/devcluster/bin

.PHONY: helm manifests konnectivity node-example

# The Node.js example (examples/node; tests/test_node_example.py builds it too): npm ci, stubs from protos/, tsc.
node-example: venv
	$(MAKE) -C examples/node

# Konnectivity's server and agent, the benchmark's peer, built from their Go module at the version
# pinned in tools/konnectivity/go.mod (the bench smoke test runs them too).
konnectivity:
	$(MAKE) -C tools/konnectivity

# helm, built from its Go module at the version pinned in tools/helm/go.mod (the chart tests use it).
helm:
	$(MAKE) -C tools/helm

# Render deploy/k8s/ from the charts in deploy/helm/ with their default values (a test fails when they differ).
manifests: venv helm
	$(BIN)/python deploy/helm/render.py

# buf and the Go code generators of clients/go, built from source at the versions pinned in
# tools/*/go.mod into tools/bin/ (ignored); rebuilt only when a pin changes.
TOOLS_BIN := tools/bin
PROTO_TOOLS := $(TOOLS_BIN)/buf $(TOOLS_BIN)/protoc-gen-go $(TOOLS_BIN)/protoc-gen-go-grpc
.PHONY: proto-tools go-protos proto-baseline

proto-tools: $(PROTO_TOOLS)

# A unique temporary name, so concurrent makes do not clobber each other.
$(TOOLS_BIN)/buf: tools/buf/go.mod tools/buf/go.sum
	@mkdir -p $(TOOLS_BIN)
	cd tools/buf && go build -o ../bin/buf.tmp.$$$$ github.com/bufbuild/buf/cmd/buf && mv -f ../bin/buf.tmp.$$$$ ../bin/buf

$(TOOLS_BIN)/protoc-gen-go: tools/protoc-gen-go/go.mod tools/protoc-gen-go/go.sum
	@mkdir -p $(TOOLS_BIN)
	cd tools/protoc-gen-go && go build -o ../bin/protoc-gen-go.tmp.$$$$ google.golang.org/protobuf/cmd/protoc-gen-go \
		&& mv -f ../bin/protoc-gen-go.tmp.$$$$ ../bin/protoc-gen-go

$(TOOLS_BIN)/protoc-gen-go-grpc: tools/protoc-gen-go/go.mod tools/protoc-gen-go/go.sum
	@mkdir -p $(TOOLS_BIN)
	cd tools/protoc-gen-go && go build -o ../bin/protoc-gen-go-grpc.tmp.$$$$ google.golang.org/grpc/cmd/protoc-gen-go-grpc \
		&& mv -f ../bin/protoc-gen-go-grpc.tmp.$$$$ ../bin/protoc-gen-go-grpc

# Regenerate the committed Go stubs of clients/go from protos/ (buf.gen.yaml; a test fails when stale).
go-protos: proto-tools
	$(TOOLS_BIN)/buf generate

# A new baseline for `buf breaking`: only for a new, deliberately incompatible version of the protocol.
proto-baseline: proto-tools
	$(TOOLS_BIN)/buf build -o protos/baseline.binpb
