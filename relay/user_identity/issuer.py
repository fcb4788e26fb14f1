"""The relay's built-in OIDC issuer: ES256 signing keys that rotate, access tokens, discovery + JWKS over HTTPS.

Keys (table ``issuer_keys`` in relay.db) go through three states:

- *next*: published in the JWKS but not signing yet, so verifiers that fetched the JWKS after it was
  made already know it when it starts signing (no "unknown kid" window after a rotation);
- *current*: the one key that signs;
- *previous*: retired by a rotation, still published until every token it signed has expired
  (``MAX_ACCESS_TOKEN_LIFETIME`` plus clock skew), then deleted.

A rotation (``clusterconnect keys rotate``, or automatically when the current key is older than
``--signing-key-max-age``) makes current previous, next current, and creates a new next.

Private keys are stored sealed (relay/storage/sealing.py, purpose ``issuer-key/<kid>``) with a key
that is not in the database, so a stolen relay.db lets no one sign a token; rows an earlier version
stored in the clear are sealed on start.

The discovery document and JWKS are served by a small HTTPS endpoint (asyncio + h11, GET only, the
relay's serving certificate), so the auth proxy verifies these tokens like any other issuer's.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import ssl
import time
from collections.abc import Callable
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
from clusterconnect.relay.storage.sealing import SealingKey
from clusterconnect.relay.storage.sqlite import open_db, transaction

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

_SCHEMA = """
CREATE TABLE IF NOT EXISTS issuer_keys (
    kid TEXT PRIMARY KEY,
    private_pem TEXT NOT NULL,  -- SEALED_PREFIX + base64 of the sealed PKCS#8 PEM
    created_unix INTEGER NOT NULL,
    activated_unix INTEGER NOT NULL DEFAULT 0,  -- 0: next key, published but not signing yet
    retired_unix INTEGER NOT NULL DEFAULT 0     -- >0: previous key, published until its tokens expired
);
"""


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
    if not stored.startswith(SEALED_PREFIX):  # only _migrate leaves nothing else behind
        raise TypeError(f"issuer signing key {kid} is not sealed")
    pem = sealing.open(base64.b64decode(stored[len(SEALED_PREFIX):]), _purpose(kid))
    key = serialization.load_pem_private_key(pem, None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):  # only _insert writes this table
        raise TypeError("issuer signing keys are ECDSA")
    return key


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: ec.EllipticCurvePrivateKey
    created_unix: int
    activated_unix: int
    retired_unix: int


class SigningKeys:
    def __init__(self, path: Path, sealing: SealingKey, max_age: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._db = open_db(path, _SCHEMA)
        # Deleted and replaced rows are overwritten with zeros, so no plaintext key of an earlier
        # version lingers in free pages of the file.
        self._db.execute("PRAGMA secure_delete=ON")
        self._sealing = sealing
        self.max_age = max_age
        self._clock = clock  # tests pass their own to age keys without waiting
        self._cache: list[SigningKey] | None = None
        self._migrate()
        self._ensure()
        self.keys()  # a key that does not open with this sealing key stops the start, not the first login

    def _migrate(self) -> None:
        """Seal rows an earlier version stored in the clear, then checkpoint so the WAL drops their pages."""
        rows = self._db.execute("SELECT kid, private_pem FROM issuer_keys WHERE private_pem LIKE ?",
                                (_PLAINTEXT_PREFIX + "%",)).fetchall()
        if not rows:
            return
        with transaction(self._db):
            for kid, pem in rows:
                self._db.execute("UPDATE issuer_keys SET private_pem = ? WHERE kid = ?",
                                 (_seal(self._sealing, kid, pem.encode()), kid))
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        log.info("issuer signing keys sealed", keys=len(rows))

    def close(self) -> None:
        self._db.close()

    def _insert(self, activated: int) -> None:
        private = ec.generate_private_key(ec.SECP256R1())
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        kid = public_jwk(private)["kid"]
        self._db.execute("INSERT INTO issuer_keys (kid, private_pem, created_unix, activated_unix) VALUES (?, ?, ?, ?)",
                         (kid, _seal(self._sealing, kid, pem), int(self._clock()), activated))

    def _ensure(self) -> None:
        now = int(self._clock())
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("DELETE FROM issuer_keys WHERE retired_unix > 0 AND retired_unix < ?",
                             (now - MAX_ACCESS_TOKEN_LIFETIME - CLOCK_SKEW,))
            current = self._db.execute(
                "SELECT COUNT(*) FROM issuer_keys WHERE activated_unix > 0 AND retired_unix = 0").fetchone()[0]
            if not current:
                self._insert(activated=now)
            pending = self._db.execute("SELECT COUNT(*) FROM issuer_keys WHERE activated_unix = 0").fetchone()[0]
            if not pending:
                self._insert(activated=0)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        self._cache = None

    def keys(self) -> list[SigningKey]:
        if self._cache is None:
            rows = self._db.execute(
                "SELECT kid, private_pem, created_unix, activated_unix, retired_unix FROM issuer_keys"
                " ORDER BY created_unix, kid").fetchall()
            self._cache = [SigningKey(kid, _ec_key(self._sealing, kid, stored), c, a, r)
                           for kid, stored, c, a, r in rows]
        return self._cache

    def current(self) -> SigningKey:
        now = self._clock()
        found = [k for k in self.keys() if k.activated_unix and not k.retired_unix]
        if not found or (self.max_age and now - found[-1].activated_unix >= self.max_age):
            self.rotate()
            found = [k for k in self.keys() if k.activated_unix and not k.retired_unix]
        return found[-1]

    def rotate(self) -> SigningKey:
        """current -> previous, next -> current, new next. Returns the new current key."""
        now = int(self._clock())
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("UPDATE issuer_keys SET retired_unix = ? WHERE activated_unix > 0 AND retired_unix = 0",
                             (now,))
            self._db.execute("UPDATE issuer_keys SET activated_unix = ? WHERE activated_unix = 0", (now,))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        self._ensure()
        current = [k for k in self.keys() if k.activated_unix and not k.retired_unix][-1]
        log.info("signing key rotated", kid=current.kid)
        return current

    def jwks(self) -> dict[str, Any]:
        """Every key that is next, current, or previous with tokens possibly still alive."""
        horizon = self._clock() - MAX_ACCESS_TOKEN_LIFETIME - CLOCK_SKEW
        if any(k.retired_unix and k.retired_unix < horizon for k in self.keys()):
            self._ensure()
        return {"keys": [public_jwk(k.private) for k in self.keys()]}


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

    def mint(self, username: str, groups: tuple[str, ...], uid: str) -> tuple[str, int]:
        """A token for the user ``username`` whose current id is ``uid`` (users.py): the relay admits it
        only while that user exists under that id."""
        key = self.keys.current()
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
