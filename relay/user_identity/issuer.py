"""The relay's built-in OIDC issuer: ES256 signing keys that rotate, access tokens, discovery + JWKS over HTTPS.

Keys (one record, ``issuer-keys/keyring`` in the Store, shared by every replica) go through three states:

- *next*: published in the JWKS but not signing yet, so verifiers that fetched the JWKS after it was
  made already know it when it starts signing (no "unknown kid" window after a rotation);
- *current*: the one key that signs;
- *previous*: retired by a rotation, still published until every token it signed has expired
  (``MAX_ACCESS_TOKEN_LIFETIME`` plus clock skew), then deleted.

A rotation (``clusterconnect keys rotate``, or automatically when the current key is older than
``--signing-key-max-age``) makes current previous, next current, and creates a new next.

Replicas: the keyring is created if absent (two replicas starting together agree on the first one's
keys) and changed by compare-and-swap, so two replicas rotating at once rotate once. Each replica
signs with the current key of its mirror and publishes the mirror's keys: a key made at another
replica is in this one's JWKS as soon as the watch brings it, before it signs (it is *next* first).

Private keys are stored sealed (relay/storage/sealing.py, purpose ``issuer-key/<kid>``) with a key
that is not in the store, so a stolen database lets no one sign a token; the ``issuer_keys`` rows of
an earlier version (sealed, or in the clear before that) are sealed, moved into the Store once, and
wiped from the old table.

The discovery document and JWKS are served by a small HTTPS endpoint (asyncio + h11, GET only, the
relay's serving certificate), so the auth proxy verifies these tokens like any other issuer's.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import sqlite3
import ssl
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from clusterconnect.logs import get_logger
from clusterconnect.oidc import fetch_json
from clusterconnect.oidc.keys import FetchJson
from clusterconnect.relay.storage.kv import Change, Versioned
from clusterconnect.relay.storage.sealing import SealingKey
from clusterconnect.relay.storage.store import Store
from clusterconnect.relay.user_identity import legacy
from clusterconnect.relay.user_identity.records import decode, encode, update

log = get_logger(__name__)

MAX_ACCESS_TOKEN_LIFETIME = 15 * 60
DEFAULT_ACCESS_TOKEN_LIFETIME = 10 * 60
CLOCK_SKEW = 60
ALGORITHM = "ES256"
DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/keys"
# An idle keep-alive connection is closed after this long without a request.
IDLE_TIMEOUT = 30.0
# A request must be complete this long after its first byte, however slowly it trickles in
# (slowloris); verifiers send a GET of a few hundred bytes at once.
REQUEST_TIMEOUT = 10.0
# The TLS handshake, before any of that (asyncio's default is 60 s).
HANDSHAKE_TIMEOUT = 10.0

KEYRING = "issuer-keys/keyring"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    jwk = {"kty": "EC", "crv": "P-256", "x": _b64(numbers.x.to_bytes(32, "big")),
           "y": _b64(numbers.y.to_bytes(32, "big"))}
    # RFC 7638 thumbprint as kid: stable, and derived from the key only.
    thumbprint = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
    return {**jwk, "kid": _b64(hashlib.sha256(thumbprint.encode()).digest()), "use": "sig", "alg": ALGORITHM}


SEALED_PREFIX = "sealed:"
_PLAINTEXT_PREFIX = "-----BEGIN"  # what earlier versions stored


def _purpose(kid: str) -> str:
    return f"issuer-key/{kid}"


def _seal(sealing: SealingKey, kid: str, pem: bytes) -> str:
    return SEALED_PREFIX + base64.b64encode(sealing.seal(pem, _purpose(kid))).decode()


def _ec_key(sealing: SealingKey, kid: str, stored: str) -> ec.EllipticCurvePrivateKey:
    if not stored.startswith(SEALED_PREFIX):  # only _seal writes the keyring
        raise TypeError(f"issuer signing key {kid} is not sealed")
    pem = sealing.open(base64.b64decode(stored[len(SEALED_PREFIX):]), _purpose(kid))
    key = serialization.load_pem_private_key(pem, None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):  # only _new_key makes keys
        raise TypeError("issuer signing keys are ECDSA")
    return key


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: ec.EllipticCurvePrivateKey
    created_unix: int
    activated_unix: int
    retired_unix: int


# One key of the keyring, as stored: {"kid", "private" (sealed), "created_unix", "activated_unix",
# "retired_unix"}; activated 0: next key; retired > 0: previous key.
Stored = dict[str, Any]


def _active(stored: Stored) -> bool:
    return bool(stored["activated_unix"]) and not stored["retired_unix"]


class SigningKeys:
    def __init__(self, store: Store, sealing: SealingKey, max_age: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._sealing = sealing
        self.max_age = max_age
        self._clock = clock  # tests pass their own to age keys without waiting
        self._opened: tuple[int, list[SigningKey]] = (0, [])  # (keyring revision, its keys unsealed)

    @classmethod
    async def open(cls, store: Store, sealing: SealingKey, max_age: float, clock: Callable[[], float] = time.time,
                   legacy_db: Path | None = None) -> SigningKeys:
        """The keys, after importing an earlier version's and making the first ones (if no replica has).
        A key that does not open with ``sealing`` stops the start (SealBroken), not the first login."""
        keys = cls(store, sealing, max_age, clock)
        await keys._import(legacy_db)
        keys.ring()  # before adding to a keyring sealed with another key
        await update(store, KEYRING, keys._complete)
        keys.ring()
        return keys

    async def _import(self, db: Path | None) -> None:
        tables = legacy.pending(self.store, db, "issuer_keys")
        if tables:
            ring = [{"kid": r["kid"], "private": self._sealed_row(r["kid"], r["private_pem"]),
                     "created_unix": int(r["created_unix"]), "activated_unix": int(r["activated_unix"]),
                     "retired_unix": int(r["retired_unix"])} for r in tables["issuer_keys"]]
            # Into an empty keyring only: another replica's keys, if any, stay the ones that sign.
            if ring and self.store.get(KEYRING) is None:
                await self.store.commit(Change(expect={KEYRING: 0}, put={KEYRING: encode({"keys": ring})}))
            await legacy.import_once(self.store, ["issuer_keys"], {})
            log.info("issuer signing keys of an earlier version imported", keys=len(ring))
        if db is not None and self.store.get(legacy.MARKER + "issuer_keys") is not None:
            _wipe_table(db)

    def _sealed_row(self, kid: str, stored: str) -> str:
        if stored.startswith(SEALED_PREFIX):
            _ec_key(self._sealing, kid, stored)  # SealBroken now if it does not open with this key
            return stored
        return _seal(self._sealing, kid, stored.encode())  # what versions before sealing stored

    def _new_key(self, activated: int) -> Stored:
        private = ec.generate_private_key(ec.SECP256R1())
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        kid = public_jwk(private)["kid"]
        return {"kid": kid, "private": _seal(self._sealing, kid, pem), "created_unix": int(self._clock()),
                "activated_unix": activated, "retired_unix": 0}

    def _stored(self, current: Versioned | None) -> list[Stored]:
        document = decode(current)
        ring = document.get("keys") if document is not None else None
        fields = ("kid", "private", "created_unix", "activated_unix", "retired_unix")
        if not isinstance(ring, list) or not all(isinstance(k, dict) and all(f in k for f in fields) for k in ring):
            return []  # absent, or not a keyring this version reads
        return ring

    def _complete(self, current: Versioned | None, ring: list[Stored] | None = None) -> Change | None:
        """The keyring with what it lacks (a current and a next key) and without previous keys whose
        tokens have all expired; None when it needs nothing."""
        before = self._stored(current) if ring is None else ring
        now = int(self._clock())
        horizon = now - MAX_ACCESS_TOKEN_LIFETIME - CLOCK_SKEW
        after = [k for k in before if not (k["retired_unix"] and k["retired_unix"] < horizon)]
        if not any(_active(k) for k in after):
            after.append(self._new_key(activated=now))
        if not any(not k["activated_unix"] for k in after):
            after.append(self._new_key(activated=0))
        if after == before and ring is None:
            return None
        return Change(put={KEYRING: encode({"keys": after})})

    def ring(self) -> list[SigningKey]:
        """The keyring of this replica's mirror, unsealed (once per change of it)."""
        return self._unsealed(self.store.get(KEYRING))

    def _unsealed(self, current: Versioned | None) -> list[SigningKey]:
        revision = current.revision if current is not None else 0
        if self._opened[0] != revision:
            ring = sorted(self._stored(current), key=lambda k: (k["created_unix"], k["kid"]))
            self._opened = (revision, [
                SigningKey(k["kid"], _ec_key(self._sealing, k["kid"], k["private"]), k["created_unix"],
                           k["activated_unix"], k["retired_unix"]) for k in ring])
        return self._opened[1]

    def _signing(self, keys: list[SigningKey] | None = None) -> SigningKey | None:
        found = [k for k in (self.ring() if keys is None else keys) if k.activated_unix and not k.retired_unix]
        return found[-1] if found else None

    async def current(self) -> SigningKey:
        """The key that signs; rotated first when it is older than ``max_age``."""
        key = self._signing()
        if key is None or (self.max_age and self._clock() - key.activated_unix >= self.max_age):
            return await self._rotate_from(key.kid if key is not None else None, due_only=True)
        return key

    async def rotate(self) -> SigningKey:
        """current -> previous, next -> current, new next. Returns the new current key."""
        key = self._signing()
        return await self._rotate_from(key.kid if key is not None else None, due_only=False)

    async def _rotate_from(self, kid: str | None, due_only: bool) -> SigningKey:
        """Rotate away from ``kid``, unless another replica did meanwhile (or, ``due_only``, the key
        signing now is not due): two replicas rotating at once rotate once."""
        def decide(current: Versioned | None) -> Change | None:
            ring = [dict(k) for k in self._stored(current)]
            active = [k for k in ring if _active(k)]
            signing = max(active, key=lambda k: (k["created_unix"], k["kid"])) if active else None
            if signing is not None and signing["kid"] != kid:
                return self._complete(current)  # rotated elsewhere already
            if due_only and signing is not None and not (
                    self.max_age and self._clock() - signing["activated_unix"] >= self.max_age):
                return self._complete(current)
            now = int(self._clock())
            for k in active:
                k["retired_unix"] = now
            for k in ring:
                if not k["activated_unix"]:
                    k["activated_unix"] = now
            return self._complete(current, ring)

        written, settled = await update(self.store, KEYRING, decide)
        key = self._signing(self._unsealed(settled))  # settled: perhaps newer than this replica's mirror
        assert key is not None  # the keyring as written (here or by the replica that won) has one
        if written and key.kid != kid:
            log.info("signing key rotated", kid=key.kid)
        return key

    def jwks(self) -> dict[str, Any]:
        """Every key that is next, current, or previous with tokens possibly still alive."""
        horizon = self._clock() - MAX_ACCESS_TOKEN_LIFETIME - CLOCK_SKEW
        return {"keys": [public_jwk(k.private) for k in self.ring()
                         if not (k.retired_unix and k.retired_unix < horizon)]}


def _wipe_table(db: Path) -> None:
    """Delete the old table's rows so no private key (of versions before sealing: in the clear) stays in
    the file: secure_delete zeroes the freed pages, the checkpoint drops the WAL's copies."""
    if not db.exists():
        return
    with closing(sqlite3.connect(db)) as conn:
        table = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'issuer_keys'").fetchone()
        if not table or not conn.execute("SELECT 1 FROM issuer_keys LIMIT 1").fetchone():
            return
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute("DELETE FROM issuer_keys")
        conn.commit()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


class Issuer:
    """Mints access tokens for the built-in users."""

    def __init__(self, url: str, audience: str, keys: SigningKeys, lifetime: int,
                 clock: Callable[[], float] = time.time) -> None:
        if not 1 <= lifetime <= MAX_ACCESS_TOKEN_LIFETIME:
            raise ValueError(f"access token lifetime must be 1..{MAX_ACCESS_TOKEN_LIFETIME} seconds")
        self.url = url
        self.audience = audience
        self.keys = keys
        self.lifetime = lifetime
        self._clock = clock  # tests pass their own to mint tokens that have expired

    async def mint(self, username: str, groups: tuple[str, ...], uid: str) -> tuple[str, int]:
        """A token for the user ``username`` whose current id is ``uid`` (users.py): the relay admits it
        only while that user exists under that id."""
        key = await self.keys.current()
        now = int(self._clock())
        expires = now + self.lifetime
        claims = {"iss": self.url, "sub": username, "uid": uid, "aud": self.audience, "groups": list(groups),
                  "iat": now, "nbf": now, "exp": expires, "jti": secrets.token_urlsafe(12)}
        token = jwt.encode(claims, key.private, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": "JWT"})
        return token, expires

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.url,
            "jwks_uri": self.url + JWKS_PATH,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "claims_supported": ["iss", "sub", "uid", "aud", "groups", "iat", "nbf", "exp", "jti"],
        }

    def document(self, path: str) -> dict[str, Any] | None:
        if path == DISCOVERY_PATH:
            return self.discovery()
        if path == JWKS_PATH:
            return self.keys.jwks()
        return None

    def local_fetch(self) -> FetchJson:
        """A fetch for the relay's own Verifier: this issuer's documents from memory, others over HTTPS."""
        async def fetch(url: str, ca_pem: str | None) -> dict[str, Any]:
            if url.startswith(self.url + "/"):
                document = self.document(url[len(self.url):])
                if document is not None:
                    return document
            return await fetch_json(url, ca_pem)
        return fetch


class IssuerEndpoint:
    """HTTPS: GET /.well-known/openid-configuration and GET /keys; anything else 404/405.

    asyncio.Server runs each connection in a task of its own; this endpoint is their owner: it
    keeps them in ``_connections``, and ``close`` cancels and awaits them.
    """

    def __init__(self, issuer: Issuer, cert: Path, key: Path, request_timeout: float = REQUEST_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.issuer = issuer
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.load_cert_chain(cert, key)
        self.tls.set_alpn_protocols(["http/1.1"])
        self.server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._serve, host, port, ssl=self.tls,
                                                 ssl_handshake_timeout=min(HANDSHAKE_TIMEOUT, self.request_timeout))
        bound: int = self.server.sockets[0].getsockname()[1]
        return bound

    async def close(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # asyncio.Server runs each connection in a task
        self._connections.add(task)
        try:
            await self._exchange(reader, writer)
        finally:
            self._connections.discard(task)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # of the request being read; None while idle between requests
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    until = deadline if deadline is not None else loop.time() + self.idle_timeout
                    async with asyncio.timeout_at(until):
                        data = await reader.read(65536)
                    if deadline is None and data:
                        deadline = loop.time() + self.request_timeout
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    writer.write(self._respond(conn, event))
                    async with asyncio.timeout_at(deadline):  # a client that does not read is cut too
                        await writer.drain()
                elif isinstance(event, h11.ConnectionClosed) or conn.our_state is h11.MUST_CLOSE:
                    return
                elif conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                    # The next request gets a clock of its own, from its first byte (here already if pipelined).
                    deadline = loop.time() + self.request_timeout if conn.trailing_data[0] else None
        except (h11.RemoteProtocolError, OSError, TimeoutError, ssl.SSLError):
            return
        finally:
            writer.close()

    def _respond(self, conn: h11.Connection, request: h11.Request) -> bytes:
        path = request.target.decode("latin-1").split("?", 1)[0]
        document = self.issuer.document(path) if request.method in (b"GET", b"HEAD") else None
        if document is not None:
            status, body = 200, json.dumps(document).encode()
        elif request.method not in (b"GET", b"HEAD"):
            status, body = 405, b'{"error":"method not allowed"}'
        else:
            status, body = 404, b'{"error":"not found"}'
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                   ("Cache-Control", "max-age=60")]
        out = conn.send(h11.Response(status_code=status, headers=headers))
        if request.method != b"HEAD":
            out += conn.send(h11.Data(data=body))
        return out + conn.send(h11.EndOfMessage())
