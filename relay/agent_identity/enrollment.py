"""Agent enrollment at the relay: join tokens, agent certificates, and who an agent is.

Records on the Store (relay/storage/store.py), next to the cluster registry:
- ``join-tokens/<sha256 of the token>`` → {"cluster", "expires_unix", "used_unix"}: each one-time
  join token. Tokens are 256-bit random secrets, so a plain hash is enough. Using one is a
  compare-and-swap on its revision, so a token works once whichever replica it reaches.
- ``agent-certificates/<cluster>`` → {"current_serial", "current_not_after_unix", "previous_serial",
  "previous_not_after_unix"}: the serial of the cluster's current certificate and of the one that
  renewed into it. These are the only certificates of the cluster the relay accepts: an agent keeps
  using the previous one on connections opened before a renewal. Removing the cluster deletes the
  record, so both stop working at once (at every replica), even though they are still within their validity.

Earlier versions kept both in SQLite tables (agent_join_tokens, agent_certificates): imported once.

``AgentAuthenticator`` turns the client certificate of a call (the relay's agent port requires one,
and the TLS handshake already verified it against the agent CA) into a cluster name; it reads the
Store's memory, never etcd.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from clusterconnect import cliargs
from clusterconnect.errors import ClusterConnectError, ResourceExhausted, StartupError
from clusterconnect.logs import get_logger
from clusterconnect.pki import KeyPair, ca_hash
from clusterconnect.ratelimit import FailureLimiter, peer_address
from clusterconnect.relay.agent_identity import pki as agent_pki
from clusterconnect.relay.agent_identity.pki import AgentIdentity, CsrRefused
from clusterconnect.relay.rpc import UnaryContext, abort_with
from clusterconnect.relay.storage.clusters import ClusterStore
from clusterconnect.relay.storage.kv import Change
from clusterconnect.relay.storage.sealing import SealingKey
from clusterconnect.relay.storage.store import Store, decode, encode
from clusterconnect.v1 import enrollment_pb2, enrollment_pb2_grpc

log = get_logger(__name__)

JOIN_TOKEN_LIFETIME = 24 * 3600
TOKENS = "join-tokens/"
CERTIFICATES = "agent-certificates/"
# Expired tokens are swept when a cluster's tokens are; at most this many per commit (etcd's --max-txn-ops is 128).
_SWEEP_LIMIT = 64


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _int(document: dict[str, Any], name: str) -> int:
    value = document.get(name, 0)
    return value if isinstance(value, int) else 0


def _legacy_tokens(rows: list[dict[str, object]]) -> dict[str, bytes]:
    return {TOKENS + str(row["token_sha256"]): encode({
        "cluster": str(row["cluster"]), "expires_unix": int(str(row["expires_unix"])),
        "used_unix": int(str(row.get("used_unix") or 0))}) for row in rows}


def _legacy_certificates(rows: list[dict[str, object]]) -> dict[str, bytes]:
    return {CERTIFICATES + str(row["cluster"]): encode({
        "current_serial": str(row["current_serial"]),
        "current_not_after_unix": int(str(row["current_not_after_unix"])),
        "previous_serial": str(row.get("previous_serial") or ""),
        "previous_not_after_unix": int(str(row.get("previous_not_after_unix") or 0))}) for row in rows}


class EnrollmentStore:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock  # tests pass their own to expire join tokens and certificates without waiting

    @classmethod
    async def open(cls, store: Store, clock: Callable[[], float] = time.time) -> EnrollmentStore:
        """The records on ``store``; an earlier version's tables are imported on the first start."""
        tokens = await store.import_once("agent_join_tokens", _legacy_tokens)
        certificates = await store.import_once("agent_certificates", _legacy_certificates)
        if tokens or certificates:
            log.info("enrollment imported from the earlier tables", join_tokens=tokens, certificates=certificates)
        return cls(store, clock)

    async def create_join_token(self, cluster: str, lifetime: int = JOIN_TOKEN_LIFETIME) -> tuple[str, int]:
        """A new one-time token for ``cluster`` (shown once). Certificates of an earlier cluster of the
        same name are forgotten, in the same commit."""
        token = secrets.token_urlsafe(32)
        expires = int(self._clock()) + lifetime
        record = encode({"cluster": cluster, "expires_unix": expires, "used_unix": 0})
        await self.store.commit(Change(delete=self._revocation(cluster), put={TOKENS + _digest(token): record}))
        return token, expires

    async def consume_join_token(self, cluster: str, token: str) -> bool:
        """True exactly once per valid token, at whichever replica: marking it used is a compare-and-swap."""
        now = int(self._clock())
        key = TOKENS + _digest(token)
        # Read from the KV, not the mirror: the token may have been made at another replica a moment ago.
        current = await self.store.read(key)
        if current is None:
            return False
        document = decode(current.value)
        if (document is None or document.get("cluster") != cluster or _int(document, "used_unix")
                or _int(document, "expires_unix") <= now):
            return False
        used = encode({**document, "used_unix": now})
        return await self.store.commit(Change(expect={key: current.revision}, put={key: used}))

    async def record_certificate(self, cluster: str, serial: int, not_after_unix: int,
                                 previous: AgentIdentity | None = None) -> None:
        await self.store.put(CERTIFICATES + cluster, encode({
            "current_serial": format(serial, "x"), "current_not_after_unix": not_after_unix,
            "previous_serial": format(previous.serial, "x") if previous else "",
            "previous_not_after_unix": previous.not_after_unix if previous else 0,
        }))

    def accepts(self, identity: AgentIdentity, now: float | None = None) -> bool:
        """Is this the cluster's current certificate, or the one it renewed from, and not expired?"""
        now = self._clock() if now is None else now
        if identity.not_after_unix <= now:
            return False
        document = self.store.get_json(CERTIFICATES + identity.cluster)
        if document is None:
            return False
        serial = format(identity.serial, "x")
        return serial in (document.get("current_serial"), document.get("previous_serial"))

    def _revocation(self, cluster: str) -> list[str]:
        """The keys that revoking ``cluster`` deletes: its certificates, its tokens, and long-expired tokens."""
        stale = int(self._clock()) - 86400
        keys = [CERTIFICATES + cluster] if self.store.get(CERTIFICATES + cluster) else []
        swept = 0
        for key, _ in self.store.list(TOKENS):
            document = self.store.get_json(key) or {}
            if document.get("cluster") == cluster:
                keys.append(key)
            elif _int(document, "expires_unix") < stale and swept < _SWEEP_LIMIT:
                keys.append(key)
                swept += 1
        return keys

    async def revoke(self, cluster: str) -> None:
        """Forget the cluster's certificates and unused tokens (cluster removed or re-added)."""
        keys = self._revocation(cluster)
        if keys:
            await self.store.commit(Change(delete=keys))


class AgentAuthenticator:
    """The cluster of the agent making a call, from its verified client certificate."""

    # Room for a large fleet (an entry is about 1 KiB): with 10,000 agents, a limit below the fleet
    # meant clearing the cache over and over, and parsing certificates on the event loop again.
    # When full, the oldest entry goes, not all of them at once.
    _CACHE_LIMIT = 32_768

    def __init__(self, enrollment: EnrollmentStore, clusters: ClusterStore) -> None:
        self.enrollment = enrollment
        self.clusters = clusters
        # Parsing a certificate per Accept stream is avoidable work: cache by the PEM grpc hands us.
        self._cache: dict[bytes, AgentIdentity | None] = {}

    def identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> AgentIdentity | None:
        pems = list(context.auth_context().get("x509_pem_cert") or [])
        if len(pems) != 1:
            return None
        pem = pems[0]
        if pem not in self._cache:
            if len(self._cache) >= self._CACHE_LIMIT:
                del self._cache[next(iter(self._cache))]
            self._cache[pem] = agent_pki.identity_of(pem)
        return self._cache[pem]

    async def authenticate(self, context: grpc.aio.ServicerContext[Any, Any], claimed: str | None) -> AgentIdentity:
        """The caller's identity; aborts the call unless it is an accepted certificate of ``claimed``."""
        identity = self.identify(context)
        if identity is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "agent certificate missing: agents connect to the relay's agent port with the certificate"
                " they obtained by joining",
            )
        if claimed is not None and claimed != identity.cluster:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the agent certificate is for cluster {identity.cluster!r}, not {claimed!r}",
            )
        if self.clusters.get(identity.cluster) is None or not self.enrollment.accepts(identity):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"agent certificate of cluster {identity.cluster} is no longer valid"
                " (cluster removed, certificate replaced or expired)",
            )
        return identity


class Enrollment(enrollment_pb2_grpc.EnrollmentServicer):
    def __init__(self, enrollment: EnrollmentStore, clusters: ClusterStore, authenticator: AgentAuthenticator,
                 agent_ca: KeyPair, relay_ca_pem: bytes, relay_ca_hash: str, agent_port: int,
                 lifetime_seconds: int, join_limiter: FailureLimiter) -> None:
        self.enrollment = enrollment
        self.join_limiter = join_limiter  # failed Joins per client address and overall
        self.clusters = clusters
        self.authenticator = authenticator
        self.agent_ca = agent_ca
        self.relay_ca_pem = relay_ca_pem
        self.relay_ca_hash = relay_ca_hash
        self.agent_port = agent_port
        self.lifetime = datetime.timedelta(seconds=lifetime_seconds)

    async def GetCA(self, request: enrollment_pb2.GetCARequest, context: UnaryContext) -> enrollment_pb2.GetCAResponse:
        return enrollment_pb2.GetCAResponse(
            ca_pem=self.relay_ca_pem.decode(), ca_hash=self.relay_ca_hash, agent_port=self.agent_port
        )

    async def _checked_csr(self, context: UnaryContext, csr_pem: bytes, cluster: str) -> x509.CertificateSigningRequest:
        try:
            return agent_pki.validate_csr(csr_pem, cluster)
        except CsrRefused as exc:
            log.warning("agent CSR refused", cluster=cluster, reason=str(exc))
            await context.abort(exc.grpc_status, f"CSR refused: {exc}")
        except ClusterConnectError as exc:  # CsrInvalid
            await abort_with(context, exc)

    async def _issue(self, context: UnaryContext, csr: x509.CertificateSigningRequest, cluster: str,
                     previous: AgentIdentity | None) -> enrollment_pb2.AgentCertificate:
        cert = agent_pki.issue(self.agent_ca, csr, cluster, self.lifetime)
        not_after = int(cert.not_valid_after_utc.timestamp())
        try:
            await self.enrollment.record_certificate(cluster, cert.serial_number, not_after, previous)
        except ClusterConnectError as exc:  # Unavailable: a certificate not recorded is not handed out
            await abort_with(context, exc)
        log.info("agent certificate issued", cluster=cluster, serial=format(cert.serial_number, "x"),
                 not_after_unix=not_after, renewal=previous is not None)
        return enrollment_pb2.AgentCertificate(
            certificate_pem=cert.public_bytes(Encoding.PEM) + self.agent_ca.cert_pem, not_after_unix=not_after
        )

    async def Join(self, request: enrollment_pb2.JoinRequest, context: UnaryContext) -> enrollment_pb2.JoinResponse:
        cluster = request.cluster
        source = peer_address(context.peer())
        try:
            self.join_limiter.check(source)
        except ResourceExhausted as exc:
            log.debug("agent join refused", cluster=cluster, reason="rate limited", peer=context.peer())
            await abort_with(context, exc)
        csr = await self._checked_csr(context, request.csr_pem, cluster)
        try:
            consumed = self.clusters.get(cluster) is not None and \
                await self.enrollment.consume_join_token(cluster, request.join_token)
        except ClusterConnectError as exc:  # Unavailable (etcd unreachable): the token stays unused
            await abort_with(context, exc)
        if not consumed:
            self.join_limiter.failed(source)
            log.warning("agent join refused", cluster=cluster, peer=context.peer())
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"join token not valid for cluster {cluster!r} (unknown, already used or expired):"
                " get a new one from `clusterconnect clusters add`",
            )
        certificate = await self._issue(context, csr, cluster, None)
        log.info("agent joined", cluster=cluster, peer=context.peer())
        return enrollment_pb2.JoinResponse(certificate=certificate, agent_port=self.agent_port)

    async def Renew(self, request: enrollment_pb2.RenewRequest, context: UnaryContext) -> enrollment_pb2.RenewResponse:
        identity = await self.authenticator.authenticate(context, None)
        csr = await self._checked_csr(context, request.csr_pem, identity.cluster)
        return enrollment_pb2.RenewResponse(certificate=await self._issue(context, csr, identity.cluster, identity))


# -- wiring (called from relay/main.py) ---------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser) -> None:
    cliargs.add_flag(parser, "--agent-listen", default="0.0.0.0:8444",
                     help="HOST:PORT of the agent endpoint: mutual TLS, only agent certificates of this relay")
    cliargs.add_flag(parser, "--agent-advertise-port", type=int, default=0,
                     help="agent port as agents reach it, if a balancer maps it (default: the listening port)")
    cliargs.add_flag(parser, "--agent-cert-lifetime", type=int, default=24 * 3600,
                     help="seconds an agent certificate is valid; agents renew at two thirds of it")


def _pem_blocks(data: bytes) -> list[bytes]:
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    return [part[part.index(begin):] + end + b"\n" for part in data.split(end)[:-1] if begin in part]


def serving_chain(cert_path: Path, ca_path: Path | None) -> tuple[bytes, bytes]:
    """The chain the relay presents (its certificate, then its CA) and the CA agents pin.

    Agents discover the CA from the handshake (they pin its hash), so it must be in the chain.
    With an operator's --tls-cert, the file must hold the chain up to the CA whose hash is pinned;
    the last certificate of the file is that CA.
    """
    chain = cert_path.read_bytes()
    blocks = _pem_blocks(chain)
    if ca_path is not None:
        ca = ca_path.read_bytes()
        if ca.strip() not in [b.strip() for b in blocks]:
            chain = chain.rstrip(b"\n") + b"\n" + ca
        return chain, ca
    return chain, blocks[-1] if blocks else b""


class AgentEnrollment:
    """Everything agent identity adds to the relay process."""

    def __init__(self, args: argparse.Namespace, store: EnrollmentStore, agent_ca: KeyPair, clusters: ClusterStore,
                 relay_ca_pem: bytes) -> None:
        self.args = args
        self.store = store
        self.agent_ca = agent_ca
        self.authenticator = AgentAuthenticator(self.store, clusters)
        self.clusters = clusters
        self.relay_ca_pem = relay_ca_pem
        try:
            self.relay_ca_hash = ca_hash(relay_ca_pem) if relay_ca_pem else ""
        except ValueError:
            self.relay_ca_hash = ""
        self.agent_port = 0

    @classmethod
    async def start(cls, args: argparse.Namespace, store: Store, sealing: SealingKey, data_dir: Path,
                    clusters: ClusterStore, relay_ca_pem: bytes) -> AgentEnrollment:
        """The records on ``store`` and the agent CA, made once for every replica (an existing data
        directory's DATA_DIR/pki/agent-ca.* imported)."""
        enrollment = await EnrollmentStore.open(store)
        agent_ca = await agent_pki.ensure_agent_ca(store, sealing, data_dir / "pki")
        return cls(args, enrollment, agent_ca, clusters, relay_ca_pem)

    async def new_join_token(self, cluster: str) -> tuple[str, int, str]:
        token, expires = await self.store.create_join_token(cluster)
        return token, expires, self.relay_ca_hash

    async def revoke(self, cluster: str) -> None:
        await self.store.revoke(cluster)

    def add_to_server(self, server: grpc.aio.Server, key_pem: bytes, chain_pem: bytes) -> int:
        """Register Enrollment and bind the agent port (mutual TLS, agent CA only); returns that port."""
        credentials = grpc.ssl_server_credentials(
            [(key_pem, chain_pem)], root_certificates=self.agent_ca.cert_pem, require_client_auth=True
        )
        try:
            port = server.add_secure_port(self.args.agent_listen, credentials)
        except RuntimeError:
            port = 0
        if port == 0:
            raise StartupError(
                f"cannot listen on {self.args.agent_listen} (--agent-listen): address in use or not available")
        self.agent_port = self.args.agent_advertise_port or port
        enrollment_pb2_grpc.add_EnrollmentServicer_to_server(
            Enrollment(self.store, self.clusters, self.authenticator, self.agent_ca, self.relay_ca_pem,
                       self.relay_ca_hash, self.agent_port, self.args.agent_cert_lifetime,
                       FailureLimiter("join token")),
            server,
        )
        log.info("agent endpoint", port=port, agent_cert_lifetime=self.args.agent_cert_lifetime)
        return int(port)
