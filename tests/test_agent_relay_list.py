"""`clusterconnect-agent --relay A,B,...` (replicas without a balancer): enrollment tries the relays in turn,
and each new session goes to the next relay of the list, so an agent whose relay died moves on. Two real
relay replicas on the 3-member TLS etcd (one store, one CA, one sealing key)."""

from __future__ import annotations

import json
from pathlib import Path

from chain import free_port, wait_until
from replicas import two_replicas


def _sessions(log: Path) -> list[str]:
    """The agent endpoints of the agent's sessions so far, in order."""
    return [json.loads(line)["relay"] for line in log.read_text().splitlines()
            if '"event": "connected to relay"' in line]


def test_an_agent_given_several_relays_skips_a_dead_one_and_moves_on_when_its_relay_dies(etcd_cluster, tmp_path):
    one, two = two_replicas(etcd_cluster, tmp_path)
    try:
        one.start_relay()
        two.start_relay()
        one.add_cluster()
        nobody = f"https://127.0.0.1:{free_port()}"  # nothing listens there
        relays = ",".join([nobody, one.relay_url, two.relay_url])
        agent = one.start_agent(extra_args=("--relay", relays))  # argparse: the last --relay wins
        assert "relay not reachable for enrollment; retrying" in agent.log.read_text()
        assert _sessions(agent.log) == [f"127.0.0.1:{one.agent_port}"]
        one.processes["relay"].kill()
        wait_until(lambda: len(_sessions(agent.log)) == 2, 20, "the agent's next session", agent)
        assert _sessions(agent.log)[1] == f"127.0.0.1:{two.agent_port}"
    finally:
        one.stop_all()
        two.stop_all()
