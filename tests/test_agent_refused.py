"""An agent the relay refuses for good exits with one line and a non-zero code instead of retrying for
ever: its cluster removed, its certificate replaced, or a certificate of another cluster in its state
directory (real relay and agent processes; no cluster needed, nothing is dialled)."""

from __future__ import annotations

import shutil

import pytest
from chain import Chain, wait_until

EXIT_WITHIN = 20  # seconds: the relay ends the session at once; the agent needs no backoff to give up


@pytest.fixture
def relay(lone_relay):
    return lone_relay


def _stderr_lines(chain: Chain, name: str) -> list[str]:
    """The lines of the agent's log that are not JSON events: what a person reads when it exits."""
    text = (chain.state_dir / "logs" / f"{name}.log").read_text(errors="replace")
    return [line for line in text.splitlines() if line and not line.startswith("{")]


def _exits(chain: Chain, name: str) -> int:
    process = chain.processes[name]
    return wait_until(lambda: process.popen.poll(), EXIT_WITHIN, f"{name} to exit")


def test_agent_of_a_removed_cluster_exits(relay):
    relay.add_cluster("doomed")
    relay.start_agent(name="agent-doomed", cluster="doomed")
    relay.admin("remove", "doomed")
    assert _exits(relay, "agent-doomed") == 1
    assert _stderr_lines(relay, "agent-doomed") == [
        "error: the relay refused this agent: cluster doomed was removed"]


def test_agent_whose_certificate_was_replaced_exits(relay):
    """The cluster removed and added again: the old certificate is refused by the authenticator."""
    relay.add_cluster("again")
    relay.start_agent(name="agent-again", cluster="again").stop()
    relay.admin("remove", "again")
    relay.add_cluster("again")
    relay.start_agent(name="agent-again-old", cluster="again", wait=False)  # the old state directory
    assert _exits(relay, "agent-again-old") == 1
    lines = _stderr_lines(relay, "agent-again-old")
    assert len(lines) == 1 and lines[0].startswith("error: the relay refused this agent: agent certificate of"
                                                  " cluster again is no longer valid"), lines
    log = (relay.state_dir / "logs" / "agent-again-old.log").read_text()
    assert '"event": "connected to relay"' not in log


def test_agent_with_a_certificate_of_another_cluster_exits_before_connecting(relay):
    relay.add_cluster("alpha")
    relay.add_cluster("beta")
    relay.start_agent(name="agent-alpha", cluster="alpha").stop()
    state = relay.state_dir / "alpha-copy"
    shutil.copytree(relay.agent_state("alpha"), state)
    relay.start_agent(name="agent-beta", cluster="beta", state_dir=state, wait=False)
    assert _exits(relay, "agent-beta") == 2
    assert _stderr_lines(relay, "agent-beta") == [
        f"error: the certificate in {state / 'agent.pem'} is for cluster 'alpha', not 'beta':"
        " give the --state-dir of this cluster's agent"]
    assert '"event": "connected to relay"' not in (relay.state_dir / "logs" / "agent-beta.log").read_text()
    # Beta's token was not touched: beta's own agent joins with it.
    relay.start_agent(name="agent-beta-own", cluster="beta").stop()
