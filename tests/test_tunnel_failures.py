"""Failures along the path: each gives kubectl a clear error quickly, and every process keeps serving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from chain import STDOUT_SUFFIX, Chain, wait_until
from https_client import Endpoint
from kube import kubectl, kubectl_popen, stop

from clusterconnect.pki import create_ca


@pytest.fixture(scope="module")
def own_chain(devcluster, admin_sa_token, cluster_endpoint_kubeconfig, tmp_path_factory):
    """A chain of its own: these tests kill and restart its processes."""
    chain = Chain(tmp_path_factory.mktemp("failures"), cluster_endpoint_kubeconfig)
    kubeconfig = chain.state_dir / "kubeconfig"
    with chain.running(admin_sa_token, kubeconfig):
        yield chain, kubeconfig


def _works(kubeconfig) -> bool:
    return kubectl(kubeconfig, "get", "--raw", "/version", check=False, timeout=10).returncode == 0


def test_agent_killed_gives_clear_error_within_2s_then_recovers(own_chain):
    chain, kubeconfig = own_chain
    assert _works(kubeconfig)
    chain.processes["agent"].popen.send_signal(signal.SIGKILL)
    chain.processes["agent"].popen.wait()
    start = time.monotonic()
    result = kubectl(kubeconfig, "get", "--raw", "/version", check=False, timeout=10)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    # A ServiceAccount token is not one the relay can verify: such a caller is not told when the agent was
    # last seen (a verified, admitted one is: tests/test_connection_identity.py).
    assert result.stderr.strip().endswith("cluster dev is not connected"), result.stderr
    assert elapsed < 2.0, elapsed
    chain.start_agent()
    assert _works(kubeconfig)


def test_an_agent_gone_while_a_dial_waits_for_its_accept_is_reported_at_once(own_chain):
    """No warm stream: the Dial asks the agent for one (a DialRequest) and waits for its Accept. The agent,
    stopped (SIGSTOP) so that it cannot answer, dies: its session ends, and the waiting Dial is told so then
    ("not connected"), not when the relay's 5 s Accept timeout runs out ("did not answer"). After a drain
    this is what sends such a Dial on to the agent's next replica (tests/test_relay_forwarding.py)."""
    chain, kubeconfig = own_chain
    chain.processes["agent"].stop()
    agent = chain.start_agent(extra_args=("--warm-streams", "0"))
    waiting = None
    try:
        assert _works(kubeconfig)
        relay = chain.processes["relay"]
        before = relay.stats()["dials_requested"]
        proxy_log = chain.processes["proxy"].log
        offset = proxy_log.stat().st_size
        agent.popen.send_signal(signal.SIGSTOP)
        waiting = kubectl_popen(kubeconfig, "get", "--raw", "/version", stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        wait_until(lambda: relay.stats()["dials_requested"] > before, 10, "the Dial to ask the agent")
        agent.popen.send_signal(signal.SIGKILL)
        agent.popen.wait()
        _, err = waiting.communicate(timeout=30)
        assert waiting.returncode != 0
        assert err.decode().strip().endswith("cluster dev is not connected"), err
        # kubectl tries a 502 again: its last answer alone would not show that the first one waited 5 s.
        refusals = [json.loads(line)["reason"] for line in proxy_log.read_text()[offset:].splitlines()
                    if '"connection refused"' in line]
        assert refusals and all(r == "cluster dev is not connected" for r in refusals), refusals
    finally:
        if waiting is not None:
            stop(waiting)
        agent.popen.kill()
        agent.popen.wait()
        chain.start_agent()
    assert _works(kubeconfig)


def test_relay_killed_and_restarted_agent_reconnects_within_10s(own_chain):
    chain, kubeconfig = own_chain
    assert _works(kubeconfig)
    chain.processes["relay"].popen.send_signal(signal.SIGKILL)
    chain.processes["relay"].popen.wait()
    failed = kubectl(kubeconfig, "get", "--raw", "/version", check=False, timeout=10)
    assert failed.returncode != 0 and "cannot reach relay" in failed.stderr, failed.stderr
    chain.start_relay()
    restarted = time.monotonic()
    wait_until(lambda: _works(kubeconfig), 10, "kubectl to work through the restarted relay")
    print(f"kubectl worked again {time.monotonic() - restarted:.1f}s after the relay restarted")


def _proxy_reports(chain, name: str, cluster: str, relay_ca, expected: str) -> None:
    """A second client proxy whose path cannot open: it says why while waiting, and kubectl gets the
    same one-line reason; the chain's own proxy keeps working."""
    out = chain.state_dir / f"{name}.kubeconfig"
    # stdout (its `ready` line) apart from the log, as Chain.start_proxy keeps it: the log is JSON lines
    said = chain.state_dir / "logs" / f"{name}{STDOUT_SUFFIX}"
    with open(said, "wb") as stdout:
        process = chain.spawn(name, [
            str(chain_script("clusterconnect")), "proxy", cluster, "--relay", chain.relay_url,
            "--relay-ca", str(relay_ca), "--token", "whatever", "--port", "0", "--kubeconfig-out", str(out),
            "--state-dir", str(chain.state_dir / "proxy-state"),
        ], stdout=stdout.fileno())
    try:
        # in its log while it waits, or in its `ready` line if it serves anyway
        wait_until(lambda: expected in process.log.read_text() + said.read_text(), 15,
                   f"the proxy to report {expected!r}", process)
        result = kubectl(out, "get", "--raw", "/version", check=False, timeout=10)
        assert expected in result.stderr, result.stderr
    finally:
        process.stop()
    assert _works(chain.state_dir / "kubeconfig")


def test_unknown_cluster_is_a_clear_error(own_chain):
    chain, _ = own_chain
    _proxy_reports(chain, "proxy-nope", "nope", chain.relay_ca, "cluster nope is not registered")


def test_wrong_relay_ca_is_a_clear_error(own_chain):
    chain, _ = own_chain
    wrong_ca = chain.state_dir / "wrong-ca.crt"
    wrong_ca.write_bytes(create_ca("not the relay").cert_pem)
    _proxy_reports(chain, "proxy-wrongca", chain.cluster, wrong_ca, "TLS verification failed")


def test_missing_token(own_chain):
    chain, kubeconfig = own_chain
    cli = subprocess.run([str(chain_script("clusterconnect")), "proxy", chain.cluster, "--relay", chain.relay_url],
                         capture_output=True, text=True, timeout=30, env={**os.environ, "CLUSTERCONNECT_TOKEN": ""})
    assert cli.returncode != 0 and "a token is needed" in cli.stderr
    # A request without a token: the auth proxy answers 401 and forwards nothing. (kubectl itself would
    # fall back to prompting for a username here, so the request is sent directly.)
    endpoint = Endpoint(kubeconfig)
    conn = endpoint.connect()
    conn.request("GET", "/version", headers={"Accept": "application/json"})
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 401 and body["reason"] == "Unauthorized", body
    assert _works(kubeconfig)
    for process in chain.processes.values():
        if process.name in ("relay", "agent", "aadproxy", "proxy"):
            assert process.alive(), process.name


def test_port_in_use_is_one_clear_line(own_chain, admin_sa_token):
    chain, kubeconfig = own_chain
    port = int(kubeconfig.read_text().split("https://127.0.0.1:")[1].split()[0])
    result = subprocess.run([str(chain_script("clusterconnect")), "proxy", chain.cluster, "--relay", chain.relay_url,
                             "--relay-ca", str(chain.relay_ca), "--token-file", str(admin_sa_token),
                             "--port", str(port), "--kubeconfig-out", "-"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: port {port} on 127.0.0.1 is already in use (another proxy?); "
                                     "pick another with --port")


def chain_script(name: str):
    from chain import script
    return script(name)
