"""The Node.js example (examples/node) through the real relay, agent and auth proxy on the devcluster,
with no client proxy: stubs generated from protos/ by ts-proto, one Dial, Node's HTTP client over it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from chain import Chain

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "node"


@pytest.fixture(scope="module")
def built() -> Path:
    """`make -C examples/node`: npm ci (pinned by its package-lock.json), generate, tsc."""
    subprocess.run(["make", "--no-print-directory", "-s", "-C", str(EXAMPLE)], check=True, timeout=600)
    return EXAMPLE / "dist" / "get.js"


def _get(built: Path, chain: Chain, cluster: str, token_file: Path, path: str) -> subprocess.CompletedProcess:
    # By name, as users give it (Node warns when TLS's server name is an IP address; the relay's
    # certificate names localhost too).
    relay = "localhost:" + chain.relay_url.rsplit(":", 1)[1]
    return subprocess.run(["node", str(built), relay, str(chain.relay_ca), cluster, str(token_file), path],
                          capture_output=True, text=True, timeout=60)


def test_node_example_gets_through_the_relay(built: Path, relay_chain: Chain, admin_sa_token: Path) -> None:
    stats = relay_chain.processes["relay"].stats()
    dials_before = stats["dials_warm"] + stats["dials_requested"]
    result = _get(built, relay_chain, relay_chain.cluster, admin_sa_token, "/api/v1/namespaces/default")
    assert result.returncode == 0, result.stdout + result.stderr
    status, body = result.stdout.split(" ", 1)
    assert status == "200"
    assert json.loads(body)["metadata"]["name"] == "default"
    stats = relay_chain.processes["relay"].stats()
    assert stats["dials_warm"] + stats["dials_requested"] == dials_before + 1  # it went through this relay


def test_node_example_reports_the_relays_refusal_in_one_line(built: Path, relay_chain: Chain,
                                                             admin_sa_token: Path) -> None:
    result = _get(built, relay_chain, "no-such-cluster", admin_sa_token, "/version")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    [line] = lines
    assert line.startswith("error: 7 PERMISSION_DENIED"), line
