"""The agent's identity: joining the relay once with a token, then a client certificate it renews.

State directory (mode 700), every file mode 600:
- ``relay-ca.crt``: the relay CA bundle, pinned by hash at the first start; from then on the only
  trust anchor for the relay.
- ``agent.pem``: the agent's private key (ECDSA P-256, made here, never sent anywhere) followed by
  its certificate. One file, replaced atomically, so a key never meets the wrong certificate.
- ``agent.json``: the cluster the certificate is for and the relay's agent port.

Trust bootstrap (see protos/clusterconnect/v1/enrollment.proto): the pinned CA is looked up in the
chain the relay presents on an unverified TLS connection that carries nothing; every later
connection (GetCA, Join with the token, the tunnel, Renew) verifies the relay against that CA.
"""

from __future__ import annotations

import _ssl
import asyncio
import datetime
import json
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from clusterconnect.agentcert import build_csr, cluster_of
from clusterconnect.errors import StartupError
from clusterconnect.grpc_options import CHANNEL_OPTIONS
from clusterconnect.logs import get_logger
from clusterconnect.pki import ca_hash, write_private
from clusterconnect.v1 import enrollment_pb2, enrollment_pb2_grpc

log = get_logger(__name__)

CA_FILE = "relay-ca.crt"
IDENTITY_FILE = "agent.pem"
META_FILE = "agent.json"
# Renew once this fraction of the certificate's lifetime has passed.
RENEW_AT = 2 / 3


class EnrollmentError(StartupError):
    """The agent cannot obtain or use an identity (reported as one line, exit code 2, unless transient)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient  # the relay was not reachable: worth trying again


# -- pinning ------------------------------------------------------------------------------------


def pem_certificates(data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        return []


def find_pinned_ca(chain: list[x509.Certificate], pin: str) -> x509.Certificate | None:
    """The CA certificate of ``chain`` whose SubjectPublicKeyInfo hashes to ``pin``, if any."""
    pin = pin.strip().lower()
    for cert in chain:
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            continue
        if constraints.ca and ca_hash(cert.public_bytes(serialization.Encoding.PEM)) == pin:
            return cert
    return None


def _peer_chain_der(ssl_socket: ssl.SSLSocket) -> list[bytes]:
    """Every certificate the server presented, unverified (public from Python 3.13, in _ssl since 3.10)."""
    getter = getattr(ssl_socket, "get_unverified_chain", None)
    if getter is not None:
        return [c if isinstance(c, bytes) else c.public_bytes(_ssl.ENCODING_DER) for c in getter()]
    chain: list[_ssl.Certificate] | None = ssl_socket._sslobj.get_unverified_chain()  # type: ignore[attr-defined]  # private before 3.13
    return [c.public_bytes(_ssl.ENCODING_DER) for c in chain or []]


def presented_chain(host: str, port: int, timeout: float = 10) -> list[x509.Certificate]:
    """The relay's certificate chain, read without verifying it. Nothing is sent but a TLS hello."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            return [x509.load_der_x509_certificate(der) for der in _peer_chain_der(tls)]


def split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def discover_ca(target: str, pin: str) -> bytes:
    """Fetch the relay's CA from its TLS handshake and check it against ``pin``; returns its PEM."""
    host, port = split_target(target)
    try:
        chain = presented_chain(host, port)
    except (OSError, ssl.SSLError) as exc:
        raise EnrollmentError(f"cannot reach relay {target}: {exc}", transient=True) from None
    ca = find_pinned_ca(chain, pin)
    if ca is None:
        raise EnrollmentError(
            f"relay {target} presented no CA certificate with hash {pin}: wrong relay or --relay-ca-hash"
        )
    return ca.public_bytes(serialization.Encoding.PEM)


# -- state --------------------------------------------------------------------------------------


@dataclass
class Identity:
    key_pem: bytes
    cert_pem: bytes  # the certificate, then the agent CA
    cluster: str
    serial: int
    not_before: datetime.datetime
    not_after: datetime.datetime

    @classmethod
    def parse(cls, key_pem: bytes, cert_pem: bytes) -> Identity:
        cert = x509.load_pem_x509_certificate(cert_pem)
        return cls(key_pem, cert_pem, cluster_of(cert) or "", cert.serial_number, cert.not_valid_before_utc,
                   cert.not_valid_after_utc)

    def renew_at(self) -> datetime.datetime:
        return self.not_before + (self.not_after - self.not_before) * RENEW_AT


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def csr_for(key: ec.EllipticCurvePrivateKey, cluster: str) -> bytes:
    return build_csr(key, cluster)


class AgentState:
    """The files under --state-dir."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)

    @property
    def ca_path(self) -> Path:
        return self.directory / CA_FILE

    @property
    def identity_path(self) -> Path:
        return self.directory / IDENTITY_FILE

    def relay_ca(self) -> bytes | None:
        return self.ca_path.read_bytes() if self.ca_path.exists() else None

    def save_relay_ca(self, pem: bytes) -> None:
        write_private(self.ca_path, pem)

    def identity(self) -> Identity | None:
        if not self.identity_path.exists():
            return None
        data = self.identity_path.read_bytes()
        marker = b"-----BEGIN CERTIFICATE-----"
        index = data.find(marker)
        if index < 0:
            raise EnrollmentError(f"{self.identity_path} holds no certificate")
        return Identity.parse(data[:index], data[index:])

    def save_identity(self, key: bytes, cert: bytes) -> Identity:
        identity = Identity.parse(key, cert)
        write_private(self.identity_path, key + cert)
        return identity

    def agent_port(self) -> int:
        try:
            return int(json.loads((self.directory / META_FILE).read_text())["agent_port"])
        except (OSError, ValueError, KeyError):
            return 0

    def save_meta(self, cluster: str, agent_port: int) -> None:
        write_private(self.directory / META_FILE, json.dumps({"cluster": cluster, "agent_port": agent_port}).encode())


# -- talking to the relay -----------------------------------------------------------------------


def _channel(target: str, root: bytes, identity: Identity | None = None) -> grpc.aio.Channel:
    if identity is None:
        credentials = grpc.ssl_channel_credentials(root_certificates=root)
    else:
        credentials = grpc.ssl_channel_credentials(root, identity.key_pem, identity.cert_pem)
    return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)


def _enrollment(channel: grpc.aio.Channel) -> Any:
    return enrollment_pb2_grpc.EnrollmentStub(channel)


async def get_ca(target: str, pinned_ca: bytes, pin: str | None) -> enrollment_pb2.GetCAResponse:
    """The relay's CA bundle and agent port, over a channel verified against the pinned CA."""
    async with _channel(target, pinned_ca) as channel:
        reply: enrollment_pb2.GetCAResponse = await _enrollment(channel).GetCA(
            enrollment_pb2.GetCARequest(), timeout=15
        )
    if pin and find_pinned_ca(pem_certificates(reply.ca_pem.encode()), pin) is None:
        raise EnrollmentError("the relay's CA bundle does not contain the pinned CA")
    return reply


async def join(target: str, root: bytes, cluster: str, token: str) -> tuple[bytes, enrollment_pb2.JoinResponse]:
    """Make a key here and exchange the token and a CSR for a certificate; returns (key PEM, reply)."""
    key = new_key()
    request = enrollment_pb2.JoinRequest(cluster=cluster, join_token=token, csr_pem=csr_for(key, cluster))
    async with _channel(target, root) as channel:
        reply = await _enrollment(channel).Join(request, timeout=30)
    return key_pem(key), reply


async def renew(agent_target: str, root: bytes, identity: Identity) -> tuple[bytes, bytes]:
    """A certificate for a new key, authenticated by the current certificate; returns (key, cert)."""
    key = new_key()
    request = enrollment_pb2.RenewRequest(csr_pem=csr_for(key, identity.cluster))
    async with _channel(agent_target, root, identity) as channel:
        reply = await _enrollment(channel).Renew(request, timeout=30)
    return key_pem(key), reply.certificate.certificate_pem


def _agent_target(relay_target: str, agent_port: int) -> str:
    host, _ = split_target(relay_target)
    return f"[{host}]:{agent_port}" if ":" in host else f"{host}:{agent_port}"


class Enrolled:
    """The agent's current identity and relay trust; ``rotated`` fires each time the certificate changes."""

    def __init__(self, state: AgentState, relay_target: str, root: bytes, identity: Identity, agent_port: int) -> None:
        self.state = state
        self.relay_target = relay_target
        self.root = root
        self.identity = identity
        self.agent_target = _agent_target(relay_target, agent_port)
        self.rotated = asyncio.Event()
        # --relay's list, the one enrolled with first (the agent's main sets it); each session takes
        # the next, so one that is gone or draining is left for the next in the list.
        self.relay_targets = [relay_target]
        self._agent_targets = {relay_target: self.agent_target}

    async def use_relay(self, index: int) -> str:
        """The agent endpoint of relay ``index`` (rotating over ``relay_targets``), which a session
        connects to and renewals go to; a relay's agent port is asked once (GetCA, against our CA)."""
        relay = self.relay_targets[index % len(self.relay_targets)]
        target = self._agent_targets.get(relay)
        if target is None:
            target = _agent_target(relay, (await get_ca(relay, self.root, None)).agent_port)
            self._agent_targets[relay] = target
        self.agent_target = target
        return target

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root, self.identity.key_pem, self.identity.cert_pem)

    async def renew_forever(self) -> None:
        """Renew at two thirds of each certificate's lifetime; retry failures until it expires."""
        while True:
            now = datetime.datetime.now(datetime.UTC)
            await asyncio.sleep(max(0.0, (self.identity.renew_at() - now).total_seconds()))
            delay = 1.0
            while True:
                try:
                    key, cert = await renew(self.agent_target, self.root, self.identity)
                    identity = self.state.save_identity(key, cert)
                    break
                except (grpc.aio.AioRpcError, OSError, ValueError) as exc:
                    if isinstance(exc, grpc.aio.AioRpcError):
                        reason = f"{exc.code().name}: {exc.details()}"
                    else:
                        reason = str(exc)
                    left = (self.identity.not_after - datetime.datetime.now(datetime.UTC)).total_seconds()
                    wait = min(delay, max(left / 4, 0.5))
                    log.warning("certificate renewal failed", reason=reason, expires_in=round(left, 1),
                                retry_in=round(wait, 1))
                    await asyncio.sleep(wait)
                    delay = min(delay * 2, 60.0)
            self.identity = identity
            log.info("certificate renewed", cluster=self.identity.cluster, serial=format(self.identity.serial, "x"),
                     not_after=self.identity.not_after.isoformat())
            previous, self.rotated = self.rotated, asyncio.Event()
            previous.set()


async def enroll(state: AgentState, relay_target: str, cluster: str, join_token: str | None,
                 pin: str | None, relay_ca: bytes | None) -> Enrolled:
    """Load the identity from the state directory, or join with the token on the first start."""
    state.prepare()
    root = state.relay_ca()
    if root is not None:
        if pin and find_pinned_ca(pem_certificates(root), pin) is None:
            raise EnrollmentError(f"{state.ca_path} does not hold the CA with hash {pin}: the state directory"
                                  " belongs to another relay")
    elif relay_ca is not None:
        if pin and find_pinned_ca(pem_certificates(relay_ca), pin) is None:
            raise EnrollmentError(f"--relay-ca holds no CA with hash {pin}")
        root = relay_ca
    elif pin:
        root = discover_ca(relay_target, pin)
    identity = state.identity()
    now = datetime.datetime.now(datetime.UTC)
    if identity is not None and identity.not_after > now and root is not None:
        if identity.cluster != cluster:
            # The relay would refuse it for ever (PERMISSION_DENIED on every Connect).
            raise EnrollmentError(f"the certificate in {state.identity_path} is for cluster {identity.cluster!r},"
                                  f" not {cluster!r}: give the --state-dir of this cluster's agent")
        port = state.agent_port()
        if not port:
            try:
                port = (await get_ca(relay_target, root, pin)).agent_port
            except grpc.aio.AioRpcError as exc:
                raise EnrollmentError(f"cannot reach relay {relay_target}: {exc.code().name}", transient=True) from None
            state.save_meta(identity.cluster, port)
        return Enrolled(state, relay_target, root, identity, port)
    if identity is not None:
        log.warning("the certificate in the state directory has expired; joining again",
                    not_after=identity.not_after.isoformat())
    if root is None:
        raise EnrollmentError("first start: give --relay-ca-hash (and the join token) to pin the relay's CA")
    if not join_token:
        raise EnrollmentError(f"no valid certificate in {state.directory}: give the join token from"
                              " `clusterconnect clusters add` (CLUSTERCONNECT_JOIN_TOKEN or --join-token-file)")
    try:
        info = await get_ca(relay_target, root, pin)
        key, reply = await join(relay_target, root, cluster, join_token)
    except grpc.aio.AioRpcError as exc:
        # RESOURCE_EXHAUSTED: the relay limits failed joins per address (others behind the same NAT may
        # have failed); the right token gets through once the limit allows, so try again later.
        transient = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                   grpc.StatusCode.RESOURCE_EXHAUSTED)
        raise EnrollmentError(f"joining relay {relay_target} failed: {exc.code().name}: {exc.details()}",
                              transient=transient) from None
    # Trust the relay's own bundle from now on (it holds the pinned CA; checked in get_ca).
    state.save_relay_ca(info.ca_pem.encode() if info.ca_pem else root)
    identity = state.save_identity(key, reply.certificate.certificate_pem)
    state.save_meta(cluster, reply.agent_port)
    log.info("joined relay", cluster=cluster, serial=format(identity.serial, "x"),
             not_after=identity.not_after.isoformat(), state_dir=str(state.directory))
    return Enrolled(state, relay_target, state.relay_ca() or root, identity, reply.agent_port)
