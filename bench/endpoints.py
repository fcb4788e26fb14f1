"""Where a benchmark client connects: directly to the apiserver, or to the client proxy (the tunnel)."""

from __future__ import annotations

import http.client
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Endpoint:
    name: str  # "direct" or "tunnel"
    host: str
    port: int
    ca_pem: str
    token: str
    # The client proxy's client certificate and key (its port lets in no one without them); None: direct.
    client_files: tuple[Path, Path] | None = None

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=self.ca_pem)
        context.set_alpn_protocols(["http/1.1"])
        if self.client_files is not None:
            context.load_cert_chain(*self.client_files)
        return context

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}

    def connect(self, timeout: float = 60) -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ssl_context(), timeout=timeout)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
