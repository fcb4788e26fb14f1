"""A real etcd cluster on this machine: N members of upstream etcd (``devcluster etcdmain``), TLS with
client certificates, for the relay's etcd store (tests, `make demo-ha`).

Members talk to each other over plain HTTP on loopback (peer TLS adds nothing to what the tests
show); clients must present a certificate signed by the cluster's CA (``--client-cert-auth``).
"""

from __future__ import annotations

import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from chain import ROOT, Process, free_port, wait_until

from clusterconnect.pki import create_ca, issue_server_cert, write_private
from clusterconnect.relay.storage.etcd.client import Etcd, EtcdTLS, parse_endpoints

DEVCLUSTER = ROOT / "tests" / "devcluster" / "bin" / "devcluster"


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    process: Process | None = None

    @property
    def client_url(self) -> str:
        return f"https://127.0.0.1:{self.client_port}"


@dataclass
class EtcdCluster:
    state: Path
    size: int = 3
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pki = self.state / "pki"
        self.logs = self.state / "logs"
        if not self.members:
            self.members = [Member(f"m{i}", free_port(), free_port(), self.state / f"m{i}") for i in range(self.size)]

    # The files a client needs: --etcd-ca, --etcd-cert, --etcd-key.
    @property
    def ca_file(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def client_cert(self) -> Path:
        return self.pki / "client.crt"

    @property
    def client_key(self) -> Path:
        return self.pki / "client.key"

    @property
    def endpoints(self) -> str:
        return ",".join(m.client_url for m in self.members)

    def client_tls(self) -> EtcdTLS:
        return EtcdTLS(self.ca_file.read_bytes(), self.client_cert.read_bytes(), self.client_key.read_bytes())

    def client(self) -> Etcd:
        """A client of every member, with the cluster's client certificate (close it when done)."""
        return Etcd(parse_endpoints(self.endpoints), self.client_tls())

    def _write_pki(self) -> None:
        self.pki.mkdir(parents=True, exist_ok=True)
        ca = create_ca("clusterconnect test etcd CA")
        self.ca_file.write_bytes(ca.cert_pem)
        # Both from the project's one certificate helper: server and client auth, loopback names.
        server = issue_server_cert(ca, ["localhost", "127.0.0.1"], client_auth=True)
        (self.pki / "server.crt").write_bytes(server.cert_pem)
        write_private(self.pki / "server.key", server.key_pem)
        client = issue_server_cert(ca, ["localhost", "127.0.0.1"], client_auth=True)
        self.client_cert.write_bytes(client.cert_pem)
        write_private(self.client_key, client.key_pem)

    def start_member(self, member: Member, state: str = "new") -> Process:
        self.logs.mkdir(parents=True, exist_ok=True)
        initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)
        log = self.logs / f"etcd-{member.name}.log"
        argv = [
            str(DEVCLUSTER), "etcdmain",
            f"--name={member.name}", f"--data-dir={member.data_dir}",
            f"--listen-client-urls={member.client_url}", f"--advertise-client-urls={member.client_url}",
            f"--listen-peer-urls=http://127.0.0.1:{member.peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{member.peer_port}",
            f"--initial-cluster={initial}", f"--initial-cluster-state={state}",
            "--initial-cluster-token=clusterconnect-test",
            f"--cert-file={self.pki / 'server.crt'}", f"--key-file={self.pki / 'server.key'}",
            f"--trusted-ca-file={self.ca_file}", "--client-cert-auth",
            # A throw-away cluster: durability traded for speed, as the devcluster's own etcd does.
            "--unsafe-no-fsync", "--log-level=warn",
            # Elections within a second or so when a member goes (the defaults: 100 ms / 1 s).
            "--heartbeat-interval=100", "--election-timeout=1000",
        ]
        with log.open("ab") as out:
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        member.process = Process(f"etcd-{member.name}", popen, log)
        return member.process

    def healthy(self, member: Member) -> bool:
        """The member's /health (a linearizable read inside etcd) over TLS with our client certificate."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        try:
            with urllib.request.urlopen(f"{member.client_url}/health", context=context, timeout=1) as response:
                return b'"health":"true"' in response.read()
        except OSError:
            return False

    def start(self, timeout: float = 60) -> None:
        self._write_pki()
        for member in self.members:
            self.start_member(member)
        for member in self.members:
            wait_until(lambda m=member: self.healthy(m), timeout, f"etcd member {member.name} healthy", member.process)

    def stop(self) -> None:
        for member in self.members:
            if member.process is not None:
                member.process.stop()

    @contextmanager
    def running(self, timeout: float = 60) -> Iterator[EtcdCluster]:
        try:
            self.start(timeout)
            yield self
        finally:
            self.stop()
