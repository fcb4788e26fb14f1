"""The upstream: where the kube-apiserver is, how to verify it, and the proxy's own credential.

Two TLS contexts, both verifying the cluster CA with a hostname check:
- ``connect()`` (forwarded requests) never presents a client certificate. kube-apiserver tries the
  client certificate before the bearer token, so a proxy certificate on these connections would
  replace every caller's identity by the proxy's.
- ``connect(own_identity=True)`` presents the proxy's own client certificate, if its kubeconfig has
  one; used for the proxy's own requests (kubeapi.py: ``/version``, discovery, SubjectAccessReviews).

The proxy's own bearer token (in-cluster ServiceAccount token, or kubeconfig token / tokenFile) is
re-read from its file when the file changes (kubelet rotates projected tokens).
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from clusterconnect.errors import StartupError
from clusterconnect.socket_stream import SocketStream, open_socket_stream

SERVICEACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
CONNECT_TIMEOUT = 10.0


class TokenSource:
    """A bearer token given inline, or read from a file and re-read whenever the file changes."""

    def __init__(self, *, value: str | None = None, path: Path | None = None) -> None:
        self._value = value
        self._path = path
        self._stamp: tuple[int, int, int] | None = None

    def get(self) -> str | None:
        if self._path is None:
            return self._value
        try:
            st = self._path.stat()
        except OSError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                self._value = self._path.read_text().strip() or None
            except OSError:
                return None
            self._stamp = stamp
        return self._value


@dataclass
class ApiServer:
    host: str
    port: int
    forward_tls: ssl.SSLContext
    identity_tls: ssl.SSLContext
    server_hostname: str
    token: TokenSource = field(default_factory=TokenSource)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def connect(self, *, own_identity: bool = False) -> SocketStream:
        """A new TLS connection to the apiserver (ALPN http/1.1), as a ByteStream."""
        return await asyncio.wait_for(
            open_socket_stream(
                self.host,
                self.port,
                tls=self.identity_tls if own_identity else self.forward_tls,
                server_hostname=self.server_hostname,
            ),
            CONNECT_TIMEOUT,
        )


def _tls_context(*, cafile: str | None, cadata: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile, cadata=cadata)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["http/1.1"])
    return context


def _load_client_cert(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    # ssl only loads key material from files: a private temporary directory, removed at once.
    with tempfile.TemporaryDirectory(prefix="aadproxy-") as tmp:
        cert_path, key_path = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        context.load_cert_chain(cert_path, key_path)


def _split_server(server: str) -> tuple[str, int]:
    parsed = urlparse(server)
    if parsed.scheme != "https" or not parsed.hostname:
        raise StartupError(f"apiserver address must be https://host[:port], got {server!r}")
    if parsed.path not in ("", "/"):
        raise StartupError(f"apiserver address with a path prefix is not supported: {server!r}")
    return parsed.hostname, parsed.port or 443


def in_cluster(sa_dir: Path = SERVICEACCOUNT_DIR) -> ApiServer:
    """The apiserver of the pod's cluster, via KUBERNETES_SERVICE_HOST/PORT and the pod's SA."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise StartupError("no --kubeconfig and not in a pod (KUBERNETES_SERVICE_HOST is not set)")
    ca = sa_dir / "ca.crt"
    try:
        forward = _tls_context(cafile=str(ca), cadata=None)
        identity = _tls_context(cafile=str(ca), cadata=None)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot load the cluster CA {ca}: {exc}") from exc
    try:
        port_number = int(port)
    except ValueError:
        raise StartupError(f"KUBERNETES_SERVICE_PORT is not a port: {port!r}") from None
    return ApiServer(
        host=host.strip("[]"),
        port=port_number,
        forward_tls=forward,
        identity_tls=identity,
        server_hostname=host.strip("[]"),
        token=TokenSource(path=sa_dir / "token"),
    )


def from_kubeconfig(path: str | Path) -> ApiServer:
    """The current context's cluster (server, CA) and user (the proxy's own, optional identity)."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise StartupError(f"cannot read kubeconfig {path}: {' '.join(str(exc).split())}") from exc
    base = path.parent

    def named(kind: str, name: str | None) -> dict[str, Any]:
        for item in config.get(kind + "s") or []:
            if item.get("name") == name:
                section: dict[str, Any] = item.get(kind) or {}
                return section
        raise StartupError(f"kubeconfig {path}: no {kind} named {name!r}")

    context = named("context", config.get("current-context"))
    cluster = named("cluster", context.get("cluster"))
    user = named("user", context.get("user")) if context.get("user") else {}

    def file_or_data(section: dict[str, Any], key: str) -> bytes | None:
        data = section.get(key + "-data")
        if data:
            return base64.b64decode(data)
        if section.get(key):
            try:
                return Path(base, str(section[key])).read_bytes()
            except OSError as exc:
                raise StartupError(f"kubeconfig {path}: cannot read {key}: {exc}") from exc
        return None

    server = cluster.get("server")
    if not server:
        raise StartupError(f"kubeconfig {path}: cluster has no server")
    host, port = _split_server(server)
    if cluster.get("insecure-skip-tls-verify"):
        raise StartupError(f"kubeconfig {path}: insecure-skip-tls-verify is refused; give the cluster CA")
    ca = file_or_data(cluster, "certificate-authority")
    try:
        forward = _tls_context(cafile=None, cadata=ca.decode() if ca else None)
        identity = _tls_context(cafile=None, cadata=ca.decode() if ca else None)
    except (ssl.SSLError, ValueError) as exc:
        raise StartupError(f"kubeconfig {path}: bad certificate-authority: {exc}") from exc
    cert, key = file_or_data(user, "client-certificate"), file_or_data(user, "client-key")
    if cert and key:
        try:
            _load_client_cert(identity, cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise StartupError(f"kubeconfig {path}: bad client certificate or key: {exc}") from exc
    if user.get("token"):
        token = TokenSource(value=str(user["token"]))
    elif user.get("tokenFile"):
        token = TokenSource(path=base / user["tokenFile"])
    else:
        token = TokenSource()
    return ApiServer(
        host=host,
        port=port,
        forward_tls=forward,
        identity_tls=identity,
        server_hostname=cluster.get("tls-server-name") or host,
        token=token,
    )
