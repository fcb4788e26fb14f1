"""The client proxy's local TLS: who kubectl may trust, and who the proxy lets in.

Two CAs in STATE_DIR/tls, both made on first start:
- ``ca.crt`` signs the serving certificate; kubectl trusts it (certificate-authority-data);
- ``client-ca.crt`` signs the one client certificate (``client.crt``/``client.key``) that goes into
  every kubeconfig the proxy writes; the proxy accepts no other (mutual TLS, CERT_REQUIRED).

The port on 127.0.0.1 is reachable by every local user: the client certificate is what makes it the
kubeconfig holder's alone (the kubeconfig and the keys are mode 600). It only opens the local port;
the bearer token still crosses the tunnel and decides who the cluster sees.

Why a CA of its own for clients rather than the serving CA: the serving CA is published in every
kubeconfig as the one to trust, and that trust must not also be the key to the door. Keeping them
apart also lets the client CA be replaced (delete client-ca.*) to shut out every kubeconfig written
so far without touching what kubectl trusts.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from clusterconnect.pki import KeyPair, ensure_ca_and_client_cert, ensure_ca_and_server_cert

HOSTS = ["127.0.0.1", "localhost"]
# The client certificate's name; it never reaches the cluster, so it names no user.
CLIENT_NAME = "clusterconnect local proxy client"


@dataclass(frozen=True)
class LocalTls:
    server: ssl.SSLContext  # for the proxy's listening socket
    ca_pem: bytes  # what kubectl trusts
    client: KeyPair  # what kubectl presents (written into the kubeconfig)
    client_files: tuple[Path, Path]  # the same, as files (ssl loads a certificate from files only)

    def client_context(self) -> ssl.SSLContext:
        """A context that connects as kubectl does (the proxy's own readiness probe)."""
        context = ssl.create_default_context(cadata=self.ca_pem.decode())
        context.set_alpn_protocols(["http/1.1"])
        context.load_cert_chain(*self.client_files)
        return context


def _tls_dir(state_dir: Path) -> Path:
    return state_dir / "tls"


def local_tls(state_dir: Path) -> LocalTls:
    """The proxy's TLS, creating its CAs and certificates in STATE_DIR/tls where missing."""
    directory = _tls_dir(state_dir)
    ca, cert, key = ensure_ca_and_server_cert(directory, "clusterconnect local proxy CA", HOSTS)
    client_ca, client_cert, client_key = ensure_ca_and_client_cert(
        directory, "clusterconnect local proxy client CA", CLIENT_NAME
    )
    # Not ssl.create_default_context(CLIENT_AUTH): that trusts the system's CAs for client
    # certificates too, and any certificate a public CA issued would open the port.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(client_ca))
    # SPDY upgrades (exec, port-forward) need HTTP/1.1; never offer h2.
    context.set_alpn_protocols(["http/1.1"])
    client = KeyPair(client_cert.read_bytes(), client_key.read_bytes())
    return LocalTls(context, ca.read_bytes(), client, (client_cert, client_key))


def client_credential(state_dir: Path) -> KeyPair | None:
    """The client certificate a proxy with this state dir made, for `clusterconnect token` to hand to
    kubectl (kubectl ignores a kubeconfig's client certificate when the user has an exec plugin);
    None before any proxy ran."""
    directory = _tls_dir(state_dir)
    try:
        return KeyPair((directory / "client.crt").read_bytes(), (directory / "client.key").read_bytes())
    except FileNotFoundError:
        return None

