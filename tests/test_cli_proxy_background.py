"""`clusterconnect proxy` as a script uses it: a login that remembered the relay and its CA (no --relay,
no --relay-ca, no --login afterwards), the context named after the relay and the cluster in the first
existing file of a KUBECONFIG list (a context of the same name that is someone else's is refused, nothing
written), and `--background` / `proxy stop` (the command returns once the endpoint works; stop ends it).

Real processes throughout: the chain's relay, agent and auth proxy, the devcluster, /usr/bin/kubectl."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from chain import script

from clusterconnect.clientproxy import kubeconfig

KUBECTL = "/usr/bin/kubectl"


def _cli(*args: str, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([script("clusterconnect"), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env}, stdin=subprocess.DEVNULL)


def _kubectl(kubeconfig_list: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([KUBECTL, "--request-timeout=10s", *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "KUBECONFIG": kubeconfig_list})


def _theirs(path: Path, name: str) -> bytes:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": name,
        "clusters": [{"name": name, "cluster": {"server": "https://10.0.0.1:6443"}}],
        "users": [{"name": name, "user": {"token": "theirs"}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}]}))
    return path.read_bytes()


@pytest.fixture
def logged_in(chain, admin_sa_token, tmp_path):
    """A state dir with a login (a command printing the ServiceAccount token) that remembered the relay."""
    tunnel, _ = chain
    state = tmp_path / "state"
    printer = tmp_path / "print-token"
    printer.write_text(f"#!/bin/sh\nexec cat {admin_sa_token}\n")
    printer.chmod(0o700)
    login = _cli("login", "--token-command", str(printer), "--relay", tunnel.relay_url, "--relay-ca",
                 str(tunnel.relay_ca), "--state-dir", str(state), env={})
    assert login.returncode == 0, login.stderr
    assert "remembered" in login.stdout
    yield tunnel, state
    # No proxy outlives the test, whatever it asserted.
    _cli("proxy", "stop", "--state-dir", str(state), env={})
    for pidfile in (state / "proxies").glob("*.json"):
        try:
            os.kill(json.loads(pidfile.read_text())["pid"], signal.SIGKILL)
        except (OSError, ValueError):
            pass


def test_background_proxy_from_the_profile_into_a_kubeconfig_list_then_stop(logged_in, tmp_path):
    tunnel, state = logged_in
    theirs, absent = tmp_path / "theirs.kubeconfig", tmp_path / "absent.kubeconfig"
    their_bytes = _theirs(theirs, "dev")
    kubeconfig_list = f"{theirs}{os.pathsep}{absent}"
    env = {"KUBECONFIG": kubeconfig_list, "CLUSTERCONNECT_STATE_DIR": str(state)}
    context = kubeconfig.context_name(tunnel.relay_url, "dev")

    # Their context "dev" is not ours: refused in one line, before anything is written or left running.
    refused = _cli("proxy", "dev", "--port", "0", "--background", "--context-name", "dev", env=env)
    assert refused.returncode != 0 and refused.stdout == ""
    assert refused.stderr.startswith(f"error: {theirs} already has a cluster 'dev' that clusterconnect did not"
                                     " create: name ours with --context-name NAME"), refused.stderr
    assert len(refused.stderr.splitlines()) == 1, refused.stderr
    assert theirs.read_bytes() == their_bytes and not absent.exists()
    assert list((state / "proxies").glob("*.json")) == []

    started = _cli("proxy", "dev", "--port", "0", "--background", env=env)  # no --relay, --relay-ca, --login
    assert started.returncode == 0, started.stderr
    ready, background = started.stdout.splitlines()
    assert ready.startswith("ready https://127.0.0.1:") and f" context={context} kubeconfig={theirs} " in ready
    assert background.startswith("running in the background: pid ")
    assert background.endswith(f"stop it with: clusterconnect proxy stop {context}")
    pid = int(background.split("pid ")[1].split(",")[0])
    pidfile = next((state / "proxies").glob("*.json"))
    assert json.loads(pidfile.read_text())["pid"] == pid
    assert stat.S_IMODE(pidfile.stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(json.loads(pidfile.read_text())["log"]).stat().st_mode) == 0o600

    # kubectl, with the list, is at our context (in the first file that exists) and reaches the cluster.
    assert _kubectl(kubeconfig_list, "config", "current-context").stdout.strip() == context
    version = _kubectl(kubeconfig_list, "get", "--raw", "/version")
    assert version.returncode == 0 and "gitVersion" in version.stdout, version.stderr
    written = yaml.safe_load(theirs.read_text())
    assert [c["name"] for c in written["contexts"]] == ["dev", context] and not absent.exists()
    assert {c["name"]: c for c in written["clusters"]}["dev"] == yaml.safe_load(their_bytes)["clusters"][0]

    # A second one for the same context is refused while the first runs.
    again = _cli("proxy", "dev", "--port", "0", "--background", env=env)
    assert again.returncode == 1 and again.stderr.strip() == (
        f"error: a proxy for context {context} runs in the background already (pid {pid}): stop it with"
        f" `clusterconnect proxy stop {context}`")

    stopped = _cli("proxy", "stop", "dev", env=env)  # by its cluster's name
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"stopped the proxy for context {context} (pid {pid})"
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    assert not pidfile.exists()
    assert _kubectl(kubeconfig_list, "get", "--raw", "/version").returncode != 0  # nothing listens any more

    nothing = _cli("proxy", "stop", context, env=env)
    assert nothing.returncode == 1 and nothing.stderr.strip() == (
        f"error: no proxy for {context} runs in the background (of {state})")


def test_a_background_proxy_that_cannot_start_reports_why_and_leaves_nothing(logged_in, tmp_path):
    _, state = logged_in
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        failed = _cli("proxy", "dev", "--port", str(port), "--background", "--kubeconfig-out",
                      str(tmp_path / "kubeconfig"), env={"CLUSTERCONNECT_STATE_DIR": str(state)})
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr == (f"error: port {port} on 127.0.0.1 is already in use (another proxy?); pick another"
                             " with --port\n")
    assert list((state / "proxies").glob("*.json")) == []  # the child removed its pidfile before it exited
