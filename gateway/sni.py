"""Which cluster a connection is for: the TLS server name (SNI) ``CLUSTER.<cluster-domain>``.

SNI is in the ClientHello, before any HTTP: the gateway knows the cluster without rewriting a byte
of any request (a path prefix such as ``/clusters/NAME`` would have to be cut from every request of
every connection). kubectl sends the host of its server URL as SNI, or the kubeconfig's
``tls-server-name`` when the URL is an address (docs/clients.md).
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

from clusterconnect.errors import InvalidInput, NotFound, StartupError
from clusterconnect.tls_server import http11_server_context

# One DNS label (the relay's cluster names are labels; it checks the rest).
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_SNI_ATTRIBUTE = "clusterconnect_server_name"


class UnknownCluster(NotFound):
    """The server name does not name a cluster under the gateway's domain."""


def cluster_domain(value: str) -> str:
    """``--cluster-domain`` as a lower-case DNS name without a leading ``*.`` or trailing dot."""
    domain = value.strip().lower().removeprefix("*.").strip(".")
    if not domain or not all(_LABEL.match(label) for label in domain.split(".")):
        raise InvalidInput(f"--cluster-domain must be a DNS name such as clusters.example.com, got {value!r}")
    return domain


def cluster_of(server_name: str | None, domain: str) -> str:
    """The cluster a server name asks for: ``prod.clusters.example.com`` -> ``prod``; UnknownCluster otherwise."""
    if not server_name:
        raise UnknownCluster(f"no server name (SNI) in the TLS handshake: use https://CLUSTER.{domain}:PORT as"
                             " the server, or set tls-server-name: CLUSTER." + domain + " in the kubeconfig")
    name = server_name.lower().rstrip(".")
    cluster = name.removesuffix("." + domain)
    if cluster == name or not _LABEL.match(cluster):
        raise UnknownCluster(f"{name} is not a cluster of this gateway: server names are CLUSTER.{domain}")
    return cluster


def _remember_server_name(ssl_object: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext) -> None:
    # Python's server side does not keep the SNI it was sent; the connection reads it back (server_name_of).
    setattr(ssl_object, _SNI_ATTRIBUTE, server_name)  # an attribute SSLObject does not declare


def server_name_of(ssl_object: object) -> str | None:
    """The SNI the client sent on this connection (the transport's ``ssl_object``)."""
    name = getattr(ssl_object, _SNI_ATTRIBUTE, None)
    return name if isinstance(name, str) else None


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS for ``*.<cluster-domain>``: ALPN http/1.1 only (SPDY needs HTTP/1.1), SNI remembered per connection."""
    context = http11_server_context()
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot load the gateway's TLS certificate {cert} and key {key}: {exc}") from None
    context.sni_callback = _remember_server_name
    return context
