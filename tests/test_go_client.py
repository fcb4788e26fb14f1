"""The Go client (clients/go) through the real relay, agent and auth proxy on the devcluster, with no
client proxy: `go test ./...` in clients/go lists pods, watches, execs and port-forwards (WebSocket)
with client-go over tunnelled connections (clients/go/e2e_test.go)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from chain import Chain, free_port
from kube import echo_pod, shell_pod

ROOT = Path(__file__).resolve().parent.parent
GO_MODULE = ROOT / "clients" / "go"
NS = "go-client"
SHELL_POD, ECHO_POD = "go-client-shell", "go-client-echo"
# The e2e tests of clients/go; each must have run and passed (they skip without the environment).
E2E_TESTS = ["TestListPods", "TestWatch", "TestExecWebSocket", "TestPortForwardWebSocket", "TestDialUnknownCluster"]


@pytest.fixture(scope="module")
def pods(devcluster) -> int:
    """A shell pod for exec and an echo server for port-forward; returns the echo server's port."""
    devcluster.create_namespace(NS)
    port = free_port()
    try:
        shell_pod(devcluster.kubeconfig, SHELL_POD, NS)
        echo_pod(devcluster.kubeconfig, ECHO_POD, NS, port)
        yield port
    finally:
        for pod in (SHELL_POD, ECHO_POD):
            devcluster.kubectl("delete", "pod", pod, "-n", NS, "--wait=false", "--ignore-not-found")


def test_go_client_through_the_relay(relay_chain: Chain, pods: int, admin_sa_token: Path) -> None:
    env = {
        **os.environ,
        "CLUSTERCONNECT_TEST_RELAY": relay_chain.relay_url,
        "CLUSTERCONNECT_TEST_RELAY_CA": str(relay_chain.relay_ca),
        "CLUSTERCONNECT_TEST_CLUSTER": relay_chain.cluster,
        "CLUSTERCONNECT_TEST_TOKEN_FILE": str(admin_sa_token),  # the path: the token stays in its file
        "CLUSTERCONNECT_TEST_NAMESPACE": NS,
        "CLUSTERCONNECT_TEST_SHELL_POD": SHELL_POD,
        "CLUSTERCONNECT_TEST_ECHO_POD": ECHO_POD,
        "CLUSTERCONNECT_TEST_ECHO_PORT": str(pods),
    }
    dials_before = _dials(relay_chain)
    result = subprocess.run(["go", "test", "-count=1", "-timeout=300s", "-v", "./..."], cwd=GO_MODULE, env=env,
                            capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    passed = set(re.findall(r"^--- PASS: (\w+)", output, re.MULTILINE))
    assert set(E2E_TESTS) <= passed, f"not run or not passed: {set(E2E_TESTS) - passed}\n{output[-3000:]}"
    # This relay carried them: API requests, the exec and the port-forward are Dials of their own.
    assert _dials(relay_chain) - dials_before >= 3


def _dials(chain: Chain) -> int:
    stats = chain.processes["relay"].stats()
    return stats["dials_warm"] + stats["dials_requested"]
