"""Relay replicas on one machine (tests, `make demo-ha`): N relays on one etcd cluster (leases, routes),
each with a certificate of one relay-peer CA, and HAProxy in TCP mode in front of their user, agent
and issuer ports, so that clients and agents see one relay, as behind a cloud balancer.

The replicas are processes of a ``Chain`` (relay-0, relay-1, ...; haproxy), so the chain's agent, auth
proxy and client proxy helpers work unchanged: its relay, agent and issuer ports are HAProxy's. The
replicas share their state in etcd (``--store etcd``) and one sealing key file; each has a
--data-dir of its own, the first one the chain's (its CA file and admin credential are every
replica's: they are made once, in the store).
"""

from __future__ import annotations

import csv
import io
import resource
import secrets
import shutil
import signal
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from chain import Chain, Process, _logged_since, free_port, port_open, script, wait_until
from etcd_cluster import EtcdCluster

from clusterconnect.pki import create_ca, issue_server_cert, write_private

HAPROXY = "haproxy"


def haproxy_maxconn() -> int:
    """Connections one HAProxy process can hold: two descriptors each (client and server side), within
    the hard descriptor limit it may raise itself to (it refuses to start above it), less a margin."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return min(25000, (hard - 100) // 2) if hard != resource.RLIM_INFINITY else 25000


def balancers_for(connections: int) -> int:
    """HAProxy processes needed for ``connections`` at once (and users' beside them)."""
    return 1 + (connections + 1000) // haproxy_maxconn()


def listeners(port: int) -> int:
    """Sockets listening on 127.0.0.1:PORT (/proc/net/tcp): how many balancer processes took the port."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        return sum(1 for line in table.readlines()[1:] if line.split()[1] == local and line.split()[3] == "0A")


@dataclass
class Replica:
    index: int
    listen_port: int = field(default_factory=free_port)
    agent_port: int = field(default_factory=free_port)
    issuer_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    # Fixed, so that a restarted replica keeps the port HAProxy checks (/healthz).
    metrics_port: int = field(default_factory=free_port)
    # --etcd-endpoints of this replica alone (e.g. through blackhole.Link's, to cut it off); else the cluster's
    etcd_endpoints: str | None = None

    @property
    def name(self) -> str:
        return f"relay-{self.index}"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.listen_port}"


def haproxy_config(front: dict[str, int], replicas: list[Replica], stats_port: int = 0) -> str:
    """TCP mode, one health check per replica: GET /healthz on its metrics port (plain HTTP), so a replica
    that is stopped (SIGSTOP) or hung fails it even though its kernel still accepts TCP connections (a
    plain TCP check passed for a stopped relay). Three failures 1 s apart mark it down, and then its
    sessions are cut (on-marked-down shutdown-sessions): agents and client proxies find a hung relay
    within a few seconds instead of after their keepalive (10 s, 30 s). A connection that cannot reach
    a replica is sent to another (redispatch). The agent and issuer backends track the users' check.

    Not a TLS check: in the 10,000-agent connect storm a TLS check took over 500 ms on a busy replica
    ("Layer6 timeout"), each replica in turn was marked down and 700-1,900 agent sessions cut, and the
    reconnect storm cost all three replicas their leases; with /healthz, no lease lost and the agents
    split within 0.3 % of a third (docs/replicas.md, Figures).

    With ``stats_port``, HAProxy's statistics as CSV on http://127.0.0.1:STATS_PORT/;csv: which replicas
    it sends connections to (``servers_up``)."""
    maxconn = haproxy_maxconn()
    lines = [
        # Every agent holds one connection through the balancer for as long as it runs (the bench's
        # 10,000 simulated agents, besides users' connections): 4,000 was too few. HAProxy raises its
        # own descriptor limit to fit, up to the hard limit (ulimit -Hn); more takes a second process.
        "global", f"  maxconn {maxconn}",
        "defaults", f"  maxconn {maxconn}", "  mode tcp", "  timeout connect 1s", "  timeout client 1h",
        "  timeout server 1h",
        "  timeout check 2s", "  retries 3", "  option redispatch",
    ]
    ports = {"users": "listen_port", "agents": "agent_port", "issuer": "issuer_port"}
    for name, port in front.items():
        lines += [f"frontend {name}", f"  bind 127.0.0.1:{port}", f"  default_backend {name}-replicas",
                  f"backend {name}-replicas", "  balance roundrobin"]
        if name == "users":
            lines += ["  option httpchk GET /healthz"]
        for r in replicas:
            check = (f"check port {r.metrics_port} inter 1s fall 3 rise 2"
                     if name == "users" else f"track users-replicas/{r.name}")
            lines += [f"  server {r.name} 127.0.0.1:{getattr(r, ports[name])} {check} "
                      "on-marked-down shutdown-sessions"]
    if stats_port:
        lines += ["frontend stats", "  mode http", f"  bind 127.0.0.1:{stats_port}", "  timeout client 5s",
                  "  stats enable", "  stats uri /"]
    return "\n".join(lines) + "\n"


def balancer_name(index: int) -> str:
    """The chain's name of HAProxy process ``index`` (its log, its config file)."""
    return "haproxy" if index == 0 else f"haproxy-{index}"


def servers_up(stats_port: int, backend: str = "users-replicas") -> set[str]:
    """The servers of ``backend`` that one HAProxy process (its stats on ``stats_port``) deems up."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/;csv", timeout=5) as response:
        text = response.read().decode()
    rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
    # "UP", or "UP 1/3" (a check failed, not yet down); a server coming up is "DOWN 1/2" until it rises.
    return {row["svname"] for row in rows if row["pxname"] == backend and row["status"].startswith("UP")}


@dataclass
class ReplicaSet:
    chain: Chain
    etcd: EtcdCluster
    count: int = 3
    # e.g. --shutdown-grace-seconds 10; every replica gets them
    relay_args: list[str] = field(default_factory=list)
    replicas: list[Replica] = field(default_factory=list)
    front: dict[str, int] = field(default_factory=dict)  # HAProxy's ports: users, agents, issuer
    # HAProxy processes on the same ports (SO_REUSEPORT, HAProxy's default on Linux: the kernel spreads
    # new connections over them), for more connections than one process has descriptors for.
    balancers: int = 1
    stats_ports: list[int] = field(default_factory=list)  # one per HAProxy process

    def __post_init__(self) -> None:
        self.pki = self.chain.state_dir / "peer-pki"
        if not self.replicas:
            self.replicas = [Replica(i) for i in range(self.count)]
        if not self.front:
            self.front = {"users": free_port(), "agents": free_port(), "issuer": free_port()}

    def data_dir(self, replica: Replica) -> Path:
        return self.chain.relay_data if replica is self.replicas[0] else self.chain.state_dir / replica.name

    @property
    def sealing_key(self) -> Path:
        """The one sealing key of every replica (a mounted Secret in Kubernetes)."""
        return self.chain.state_dir / "sealing.key"

    def process(self, replica: Replica) -> Process:
        return self.chain.processes[replica.name]

    def _write_peer_pki(self) -> None:
        self.pki.mkdir(parents=True, exist_ok=True)
        ca = create_ca("clusterconnect relay-peer CA (test)")
        (self.pki / "ca.crt").write_bytes(ca.cert_pem)
        for replica in self.replicas:
            pair = issue_server_cert(ca, ["localhost", "127.0.0.1"], client_auth=True)
            (self.pki / f"{replica.name}.crt").write_bytes(pair.cert_pem)
            write_private(self.pki / f"{replica.name}.key", pair.key_pem)

    def start_haproxy(self) -> Process:
        if shutil.which(HAPROXY) is None:
            raise FileNotFoundError("haproxy is not installed (Debian: apt-get install -y haproxy; make haproxy)")
        first = None
        self.stats_ports = [free_port() for _ in range(self.balancers)]
        for i, stats_port in enumerate(self.stats_ports):
            name = balancer_name(i)
            config = self.chain.state_dir / f"{name}.cfg"  # each its own stats port, the rest alike
            config.write_text(haproxy_config(self.front, self.replicas, stats_port))
            process = self.chain.spawn(name, [shutil.which(HAPROXY) or HAPROXY, "-db", "-f", str(config)])
            first = first or process
            wait_until(lambda n=i + 1: all(listeners(port) >= n for port in self.front.values()), 10,
                       f"haproxy ({i + 1} of {self.balancers}) to listen", process)
        assert first is not None and port_open(self.front["users"])
        return first

    def start_replica(self, replica: Replica) -> Process:
        log = self.chain.state_dir / "logs" / f"{replica.name}.log"
        offset = log.stat().st_size if log.exists() else 0
        process = self.chain.spawn(replica.name, metrics_port=replica.metrics_port, argv=[
            script("clusterconnect-relay"), "serve", "--data-dir", str(self.data_dir(replica)),
            "--listen", f"127.0.0.1:{replica.listen_port}", "--agent-listen", f"127.0.0.1:{replica.agent_port}",
            "--issuer-listen", f"127.0.0.1:{replica.issuer_port}", "--log-level", self.chain.log_level,
            # Agents and token verifiers reach every replica through the balancer.
            "--agent-advertise-port", str(self.front["agents"]),
            "--issuer-url", f"https://127.0.0.1:{self.front['issuer']}",
            "--store", "etcd", "--etcd-endpoints", replica.etcd_endpoints or self.etcd.endpoints,
            "--etcd-ca", str(self.etcd.ca_file),
            "--etcd-cert", str(self.etcd.client_cert), "--etcd-key", str(self.etcd.client_key),
            "--replica-name", replica.name, "--peer-listen", f"127.0.0.1:{replica.peer_port}",
            "--peer-ca", str(self.pki / "ca.crt"), "--peer-cert", str(self.pki / f"{replica.name}.crt"),
            "--peer-key", str(self.pki / f"{replica.name}.key"), "--sealing-key-file", str(self.sealing_key),
            *self.chain.relay_args, *self.relay_args,
        ])
        wait_until(lambda: _logged_since(log, offset, "replica registered"), 20, f"{replica.name} to register",
                   process)
        self.wait_balanced(replica)
        return process

    def wait_balanced(self, replica: Replica) -> None:
        """Until every HAProxy process sends connections to ``replica``: HAProxy marks a server down at its
        first failed check (every replica, when HAProxy starts first) and up after two good ones 1 s
        apart; until then a connection to the balancer may find no replica up and be closed unanswered
        (CI: `clusters add` just after start, 'Handshake read failed (Socket closed)')."""
        for i, stats_port in enumerate(self.stats_ports):
            balancer = self.chain.processes.get(balancer_name(i))
            if balancer is None or not balancer.alive():
                continue
            wait_until(lambda p=stats_port: replica.name in servers_up(p), 15,
                       f"HAProxy ({balancer.name}) to send connections to {replica.name}", balancer,
                       interval=0.2, ignoring=(OSError,))

    def start(self) -> None:
        self._write_peer_pki()
        if not self.sealing_key.exists():
            write_private(self.sealing_key, secrets.token_hex(32).encode())  # hex, as the relay writes its own
        self.start_haproxy()
        # The first one alone: it creates the CAs, keys and admin credential the others then read.
        self.start_replica(self.replicas[0])
        for replica in self.replicas[1:]:
            self.start_replica(replica)
        self.chain.relay_port = self.front["users"]
        self.chain.agent_port = self.front["agents"]
        self.chain.issuer_port = self.front["issuer"]

    def holder(self, cluster_agents: int = 1) -> Replica:
        """The replica whose stats show ``cluster_agents`` agent sessions (the one holding the agent)."""
        def find() -> Replica | None:
            for replica in self.replicas:
                process = self.chain.processes.get(replica.name)
                if process is not None and process.alive() and process.stats().get("agents") == cluster_agents:
                    return replica
            return None

        return wait_until(find, 20, "a replica to hold the agent")

    def start_proxy_at(self, replica: Replica, token_file: Path | None, kubeconfig: Path,
                       name: str) -> tuple[Process, str]:
        """A client proxy whose relay is ``replica`` itself (not the balancer), state in STATE_DIR/NAME;
        returns the process and its `ready` line."""
        balancer, self.chain.relay_port = self.chain.relay_port, replica.listen_port
        try:
            return self.chain.start_proxy(token_file, kubeconfig, name=name, state_dir=self.chain.state_dir / name)
        finally:
            self.chain.relay_port = balancer

    def kill(self, replica: Replica) -> None:
        """kill -9: no drain, no lease revoke; its routes go when its lease runs out."""
        process = self.process(replica)
        process.popen.send_signal(signal.SIGKILL)
        process.popen.wait()

    def terminate(self, replica: Replica) -> None:
        """SIGTERM without waiting: the replica drains."""
        self.process(replica).popen.send_signal(signal.SIGTERM)

    def wait_exit(self, replica: Replica, timeout: float) -> int:
        try:
            return self.process(replica).popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{replica.name} still running after {timeout}s:\n"
                                 f"{self.process(replica).tail()}") from None
