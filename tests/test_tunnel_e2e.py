"""kubectl through the whole tunnel: client proxy -> relay -> agent -> auth proxy -> kube-apiserver.

Real processes from the console scripts, the real kubectl, the devcluster. The caller authenticates
with a ServiceAccount token that the auth proxy passes through to the apiserver.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from chain import free_port
from kube import (
    LineReader, echo_pod, echo_roundtrip, exec_in_pty, kubectl, kubectl_popen, port_forward, run_pod,
    shell_pod, stop, wait_for,
)

NS = "tunnel-e2e"


@pytest.fixture(scope="module")
def tunnel(chain, devcluster):
    devcluster.create_namespace(NS)
    return chain[1]


def test_get_and_whoami_go_through_with_the_callers_token(tunnel):
    assert "gitVersion" in kubectl(tunnel, "get", "--raw", "/version").stdout
    kubectl(tunnel, "get", "namespaces", NS)
    whoami = json.loads(kubectl(tunnel, "auth", "whoami", "-o", "json").stdout)
    assert whoami["status"]["userInfo"]["username"] == "system:serviceaccount:clusterconnect-tests:tunnel-admin"


def test_apply_get_delete(tunnel):
    manifest = json.dumps({"apiVersion": "v1", "kind": "ConfigMap",
                           "metadata": {"name": "applied", "namespace": NS}, "data": {"k": "v" * 1000}})
    kubectl(tunnel, "apply", "-f", "-", input=manifest)
    assert json.loads(kubectl(tunnel, "get", "cm", "applied", "-n", NS, "-o", "json").stdout)["data"]["k"] == "v" * 1000
    kubectl(tunnel, "delete", "cm", "applied", "-n", NS)
    assert kubectl(tunnel, "get", "cm", "applied", "-n", NS, check=False).returncode != 0


def test_watch_sees_object_created_by_another_client_within_a_second(tunnel, devcluster):
    watch = kubectl_popen(tunnel, "get", "configmaps", "-n", NS, "-w", "-o", "name",
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        lines = LineReader(watch.stdout)
        lines.wait_line(r"kube-root-ca\.crt", 30)  # the initial list arrived: the watch is established
        created = time.monotonic()
        devcluster.kubectl("create", "configmap", "watched", "-n", NS)
        lines.wait_line(r"^configmap/watched$", 5)
        assert time.monotonic() - created < 1.0
    finally:
        stop(watch)
        devcluster.kubectl("delete", "configmap", "watched", "-n", NS, "--ignore-not-found")


def test_logs_follow_streams_lines_as_written(tunnel, devcluster):
    run_pod(devcluster.kubeconfig, "ticker", NS,
            ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"])
    logs = kubectl_popen(tunnel, "logs", "-f", "-n", NS, "ticker", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        lines = LineReader(logs.stdout)
        first = int(lines.wait_line(r"^tick \d+", 30).split()[1])
        lines.wait_line(rf"^tick {first + 5}$", 10)
    finally:
        stop(logs)


@pytest.fixture(scope="module")
def shell(tunnel, devcluster):
    shell_pod(devcluster.kubeconfig, "shell", NS)
    return "shell"


@pytest.mark.parametrize("websockets", [True, False], ids=["websocket", "spdy"])
def test_exec_passes_stdin_and_exit_code(tunnel, shell, websockets):
    result = kubectl(tunnel, "exec", "-i", "-n", NS, shell, "--", "sh", "-c", "cat; exit 7",
                     input="through the tunnel\n", check=False,
                     env={"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "true" if websockets else "false"})
    assert result.stdout == "through the tunnel\n"
    assert result.returncode == 7, result.stderr


def test_exec_tty(tunnel, shell):
    screen = exec_in_pty(tunnel, NS, shell, "tty; exit 3")
    assert "/dev/pts/" in screen


@pytest.mark.parametrize("websockets", [True, False], ids=["websocket", "spdy"])
def test_port_forward_100_mib_each_way(tunnel, devcluster, websockets):
    port = free_port()
    name = f"echo-{'ws' if websockets else 'spdy'}"
    echo_pod(devcluster.kubeconfig, name, NS, port)
    forward, local = port_forward(tunnel, NS, name, port, websockets)
    try:
        sent, received, seconds = echo_roundtrip(local, 100 * 1024 * 1024)
        assert sent == received
        print(f"port-forward {'websocket' if websockets else 'spdy'}: 100 MiB each way in {seconds:.1f}s")
    finally:
        stop(forward)
