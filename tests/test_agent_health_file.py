"""A real agent whose --health-file cannot be written (its directory removed, or made read-only) while
connected: it says so once in its log, stays connected, keeps carrying kubectl's requests, and writes
the file again once it can. And SIGTERM ends the agent and the client proxy cleanly, connections open."""

from __future__ import annotations

import shutil
import signal
import subprocess

import pytest
from chain import Chain, wait_until
from kube import kubectl, kubectl_popen

HEARTBEAT = 1  # seconds (relay --heartbeat-seconds): the agent touches the file on every heartbeat


@pytest.fixture(scope="module")
def health_chain(devcluster, admin_sa_token, cluster_endpoint_kubeconfig, tmp_path_factory):
    chain = Chain(tmp_path_factory.mktemp("health"), cluster_endpoint_kubeconfig,
                  relay_args=["--heartbeat-seconds", str(HEARTBEAT)])
    health = chain.state_dir / "health" / "alive"
    health.parent.mkdir()
    kubeconfig = chain.state_dir / "kubeconfig"
    try:
        chain.start_relay()
        chain.add_cluster()
        chain.start_authproxy()
        chain.start_agent(extra_args=("--health-file", str(health)))
        chain.start_proxy(admin_sa_token, kubeconfig)
        yield chain, kubeconfig, health
    finally:
        chain.stop_all()


def _works(kubeconfig) -> bool:
    return kubectl(kubeconfig, "get", "--raw", "/version", check=False, timeout=10).returncode == 0


def _count(chain: Chain, event: str) -> int:
    return chain.processes["agent"].log.read_text(errors="replace").count(f'"event": "{event}"')


def _unwritable_then_writable(chain: Chain, kubeconfig, health, break_it, repair_it) -> None:
    agent = chain.processes["agent"]
    wait_until(health.exists, 10, "the health file to be written", agent)
    failed_before = _count(chain, "health file not written")
    repaired_before = _count(chain, "health file written again")
    connects = _count(chain, "connected to relay")
    break_it()
    wait_until(lambda: _count(chain, "health file not written") > failed_before, 10 * HEARTBEAT,
               "the agent to log that it cannot write the health file", agent)
    assert _works(kubeconfig)
    repair_it()
    wait_until(lambda: _count(chain, "health file written again") > repaired_before, 10 * HEARTBEAT,
               "the agent to write the health file again", agent)
    assert health.exists() and agent.alive() and _works(kubeconfig)
    # Logged once for the whole outage (several heartbeats failed), and the session was never dropped.
    assert _count(chain, "health file not written") == failed_before + 1
    assert _count(chain, "connected to relay") == connects


def _remove(health) -> None:
    shutil.rmtree(health.parent)


def _replace_with_a_file(health) -> None:  # unwritable even for root, unlike a read-only directory
    shutil.rmtree(health.parent)
    health.parent.write_text("not a directory")


def _restore(health) -> None:
    if health.parent.is_file():
        health.parent.unlink()
    health.parent.mkdir()


@pytest.mark.parametrize("break_it", [_remove, _replace_with_a_file], ids=["removed", "replaced-by-a-file"])
def test_health_file_directory_gone_while_connected(health_chain, break_it):
    chain, kubeconfig, health = health_chain
    _unwritable_then_writable(chain, kubeconfig, health, lambda: break_it(health), lambda: _restore(health))


def test_sigterm_ends_proxy_and_agent_cleanly_with_a_watch_open(health_chain):
    """Runs last: it stops the chain's client proxy and agent."""
    chain, kubeconfig, _ = health_chain
    watch = kubectl_popen(kubeconfig, "get", "--raw", "/api/v1/namespaces?watch=1",
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert watch.stdout is not None and watch.stdout.readline()  # the watch is open through the tunnel
        for name in ("proxy", "agent"):
            process = chain.processes[name]
            process.popen.send_signal(signal.SIGTERM)
            assert process.popen.wait(10) == 0, process.tail()
            log = process.log.read_text(errors="replace")
            if name == "agent":  # (the client proxy logs warnings only)
                assert '"event": "stopping"' in log
            for leftover in ("Task was destroyed but it is pending", "exception was never retrieved", "Traceback"):
                assert leftover not in log, f"{name}: {leftover}\n{process.tail()}"
        assert watch.wait(10) is not None  # the watch ended with the proxy
    finally:
        if watch.poll() is None:
            watch.kill()
        watch.wait()
