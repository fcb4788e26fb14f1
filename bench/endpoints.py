"""Where a benchmark client connects: directly to the apiserver, to the client proxy (the tunnel), to the
gateway (the tunnel with kubectl's kubeconfig alone), or to the apiserver through Konnectivity's
HTTP-CONNECT frontend (the peer)."""

from __future__ import annotations

import http.client
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import h11


@dataclass
class Endpoint:
    name: str  # "direct", "tunnel", "gateway" or "konnectivity"
    host: str
    port: int
    ca_pem: str
    token: str
    # The client proxy's client certificate and key (its port lets in no one without them); None: direct.
    client_files: tuple[Path, Path] | None = None
    # Konnectivity's frontend (a Unix socket, as kube-apiserver's egress selector dials it): each
    # connection is a CONNECT to host:port through it, then TLS to the apiserver end to end.
    connect_proxy: Path | None = None
    # The TLS server name (SNI) when it is not ``host``: the gateway's CLUSTER.<cluster-domain> on 127.0.0.1.
    server_name: str | None = None

    @property
    def tls_name(self) -> str:
        return self.server_name or self.host

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=self.ca_pem)
        context.set_alpn_protocols(["http/1.1"])
        if self.client_files is not None:
            context.load_cert_chain(*self.client_files)
        return context

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}

    def open_socket(self, timeout: float | None = 60) -> socket.socket:
        """A connected socket to the endpoint's TLS server (through the CONNECT proxy, if any)."""
        if self.connect_proxy is None:
            sock = socket.create_connection((self.host, self.port), timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(self.connect_proxy))
            _connect_through(sock, f"{self.host}:{self.port}")
        except BaseException:
            sock.close()
            raise
        return sock

    def connect(self, timeout: float = 60) -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ssl_context(), timeout=timeout)
        conn.sock = self.ssl_context().wrap_socket(self.open_socket(timeout), server_hostname=self.tls_name)
        return conn

    def get(self, conn: http.client.HTTPSConnection, path: str) -> bytes:
        conn.request("GET", path, headers=self.headers)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"{self.name} GET {path}: {response.status} {body[:200]!r}")
        return body


def proxy_client_files(proxy_state: Path) -> tuple[Path, Path]:
    """The client certificate and key that the client proxy with this state dir lets in."""
    return proxy_state / "tls" / "client.crt", proxy_state / "tls" / "client.key"


def _connect_through(sock: socket.socket, target: str) -> None:
    """HTTP CONNECT ``target`` on ``sock`` (h11 parses the answer); afterwards the socket is the tunnel."""
    conn = h11.Connection(h11.CLIENT)
    sock.sendall(conn.send(h11.Request(method="CONNECT", target=target, headers=[("Host", target)]))
                 + conn.send(h11.EndOfMessage()))
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"CONNECT {target}: the proxy closed the connection")
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            if not 200 <= event.status_code < 300:
                raise ConnectionError(f"CONNECT {target}: {event.status_code} {event.reason.decode()}")
            leftover, _ = conn.trailing_data
            if leftover:  # the apiserver speaks only after our TLS ClientHello
                raise ConnectionError(f"CONNECT {target}: unexpected bytes after the proxy's answer")
            return
        else:
            raise ConnectionError(f"CONNECT {target}: unexpected answer {event!r}")
