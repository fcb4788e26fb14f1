"""Konnectivity (apiserver-network-proxy), the benchmark's peer, on loopback beside our chain.

Set up as kube-apiserver uses it: the proxy server's HTTP-CONNECT frontend on a Unix socket (what the
apiserver's egress selector dials), its agent port with mutual TLS, one proxy agent that dials the
apiserver the CONNECT names. A benchmark client reaches the same apiserver with the same token, its
TLS end to end through the tunnel (Konnectivity neither terminates it nor authenticates the caller).

Both binaries are built from their Go module at the version pinned in tools/konnectivity/go.mod.
"""

from __future__ import annotations

import random
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from chain import ROOT, Chain, Process
from waiting import wait_until

from clusterconnect.pki import create_ca, issue_client_cert, issue_server_cert, write_private

TOOLS = ROOT / "tools" / "konnectivity"
SERVER = TOOLS / "bin" / "proxy-server"
AGENT = TOOLS / "bin" / "proxy-agent"


def build() -> None:
    """`make -C tools/konnectivity` (a no-op when the binaries are up to date)."""
    subprocess.run(["make", "--no-print-directory", "-s", "-C", str(TOOLS)], check=True)


@dataclass
class Konnectivity:
    socket: Path  # the HTTP-CONNECT frontend
    server: Process
    agent: Process


def _registered_port() -> int:
    """A free port below 49152: Konnectivity refuses ephemeral ones for its agent, admin and health ports."""
    while True:
        port = random.randint(20000, 49151)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def _ready(health_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def konnectivity(chain: Chain, work: Path) -> Iterator[Konnectivity]:
    """Server and agent started as processes of ``chain`` (its logs, its stop); ready once the agent is
    connected (the server's /readyz)."""
    build()
    work.mkdir(parents=True, exist_ok=True)
    ca = create_ca("konnectivity bench CA")
    serving = issue_server_cert(ca, ["127.0.0.1", "localhost"])
    agent_cert = issue_client_cert(ca, "konnectivity-agent")
    files = {"ca.crt": ca.cert_pem, "server.crt": serving.cert_pem, "server.key": serving.key_pem,
             "agent.crt": agent_cert.cert_pem, "agent.key": agent_cert.key_pem}
    for name, data in files.items():
        write_private(work / name, data)
    frontend = work / "konnectivity.sock"
    agent_port, health_port = _registered_port(), _registered_port()
    server = chain.spawn("konnectivity-server", [
        str(SERVER), "--mode=http-connect", f"--uds-name={frontend}", "--server-port=0",
        f"--cluster-cert={work / 'server.crt'}", f"--cluster-key={work / 'server.key'}",
        f"--cluster-ca-cert={work / 'ca.crt'}",
        "--agent-bind-address=127.0.0.1", f"--agent-port={agent_port}",
        "--admin-bind-address=127.0.0.1", f"--admin-port={_registered_port()}",
        "--health-bind-address=127.0.0.1", f"--health-port={health_port}",
        "--server-count=1", "--delete-existing-uds-file", "--v=0",
    ], metrics=False)
    agent = chain.spawn("konnectivity-agent", [
        str(AGENT), "--proxy-server-host=127.0.0.1", f"--proxy-server-port={agent_port}",
        f"--ca-cert={work / 'ca.crt'}", f"--agent-cert={work / 'agent.crt'}", f"--agent-key={work / 'agent.key'}",
        "--agent-id=bench", f"--health-server-port={_registered_port()}", f"--admin-server-port={_registered_port()}",
        "--v=0",
    ], metrics=False)
    try:
        def ready() -> bool:
            if not agent.alive():
                raise RuntimeError(f"Konnectivity's agent exited:\n{agent.tail()}")
            return frontend.exists() and _ready(health_port)

        wait_until(ready, 60, "Konnectivity's agent to connect to its server", server)
        yield Konnectivity(frontend, server, agent)
    finally:
        agent.stop()
        server.stop()
