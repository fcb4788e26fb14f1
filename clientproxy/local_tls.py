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

import fcntl
import ssl
from dataclasses import dataclass
from pathlib import Path

from clusterconnect.errors import StartupError
from clusterconnect.pki import KeyPair, ensure_ca_and_client_cert, ensure_ca_and_server_cert
from clusterconnect.tls_server import http11_server_context

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
    try:
        return _load_or_create(directory)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; a damaged PEM a ValueError
        raise StartupError(f"cannot use the local TLS files in {directory} ({exc}); remove them and they"
                           " are made anew at the next start (kubeconfigs are rewritten then too)") from None


def _load_or_create(directory: Path) -> LocalTls:
    directory.mkdir(parents=True, exist_ok=True)
    # Proxies of one state dir starting at once must not each make a CA: one would trust a client CA
    # that did not sign the certificate in its kubeconfig.
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ca, cert, key = ensure_ca_and_server_cert(directory, "clusterconnect local proxy CA", HOSTS)
        client_ca, client_cert, client_key = ensure_ca_and_client_cert(
            directory, "clusterconnect local proxy client CA", CLIENT_NAME
        )
        client = KeyPair(client_cert.read_bytes(), client_key.read_bytes())
        ca_pem = ca.read_bytes()
        # Not ssl.create_default_context(CLIENT_AUTH): that trusts the system's CAs for client
        # certificates too, and any certificate a public CA issued would open the port.
        context = http11_server_context()
        context.load_cert_chain(cert, key)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(client_ca))
    return LocalTls(context, ca_pem, client, (client_cert, client_key))


def client_credential(state_dir: Path) -> KeyPair | None:
    """The client certificate a proxy with this state dir made, for `clusterconnect token` to hand to
    kubectl (kubectl skips the exec plugin of a kubeconfig user that has a client certificate, so a
    login's user cannot carry it in the kubeconfig); None before any proxy ran."""
    directory = _tls_dir(state_dir)
    try:
        return KeyPair((directory / "client.crt").read_bytes(), (directory / "client.key").read_bytes())
    except FileNotFoundError:
        return None

