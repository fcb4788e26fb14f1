"""Discovery and JWKS for one issuer, cached; refetched on an unknown ``kid`` at most every few seconds.

HTTP fetches run in a worker thread (``asyncio.to_thread``) with a timeout and a size bound, so the
event loop is never blocked by a slow issuer; one lock per issuer makes concurrent requests share one
fetch. A failed refresh keeps the keys already known (an issuer outage does not lock everybody out
until the keys expire from the cache).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlparse

import jwt

from clusterconnect.errors import Unavailable
from clusterconnect.logs import get_logger
from clusterconnect.oidc.config import IssuerConfig

log = get_logger(__name__)

FETCH_TIMEOUT = 10.0
MAX_DOCUMENT = 1024 * 1024
MIN_REFRESH_INTERVAL = 10.0  # seconds between two fetches for one issuer (unknown-kid storms)
MAX_KEY_AGE = 3600.0  # keys are refreshed at least this often

# What may sign a token: asymmetric algorithms only (no "none", no HMAC).
ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)
_CURVE_OF = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}

# A JSON object as json.loads gives it.
JsonObject = dict[str, Any]
FetchJson = Callable[[str, "str | None"], Awaitable[JsonObject]]


class KeysUnavailable(Unavailable):
    """No signing keys could be obtained for an issuer (message is safe to log and to show)."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        return None


def _fetch_blocking(url: str, ca_pem: str | None) -> JsonObject:
    context = ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect())
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with opener.open(request, timeout=FETCH_TIMEOUT) as response:
            if response.status != 200:
                raise KeysUnavailable(f"{url} answered HTTP {response.status}")
            body = response.read(MAX_DOCUMENT + 1)
    except urllib.error.HTTPError as exc:
        raise KeysUnavailable(f"{url} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", exc)
        raise KeysUnavailable(f"cannot fetch {url}: {' '.join(str(reason).split())[:200]}") from None
    if len(body) > MAX_DOCUMENT:
        raise KeysUnavailable(f"{url}: document larger than {MAX_DOCUMENT} bytes")
    try:
        document = json.loads(body)
    except ValueError:
        raise KeysUnavailable(f"{url}: not JSON") from None
    if not isinstance(document, dict):
        raise KeysUnavailable(f"{url}: not a JSON object")
    return document


async def fetch_json(url: str, ca_pem: str | None) -> JsonObject:
    """GET ``url`` (https, no redirects) as a JSON object, off the event loop."""
    return await asyncio.to_thread(_fetch_blocking, url, ca_pem)


def discovery_url(issuer: IssuerConfig) -> str:
    return issuer.discovery_url or issuer.url.rstrip("/") + "/.well-known/openid-configuration"


def parse_jwks(document: JsonObject) -> dict[str, jwt.PyJWK]:
    """The usable signing keys of a JWKS document by ``kid`` (keys without kid get "" — first wins)."""
    keys: dict[str, jwt.PyJWK] = {}
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise KeysUnavailable("JWKS has no keys list")
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC"):
            continue  # symmetric ("oct") and unknown key types can never verify a token here
        if entry.get("use") not in (None, "sig"):
            continue
        if "alg" in entry and entry["alg"] not in ALLOWED_ALGORITHMS:
            continue
        if any(field in entry for field in ("d", "p", "q")):
            continue  # a private key published by mistake: refuse to use it
        try:
            key = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            continue
        kid = entry.get("kid")
        keys.setdefault(kid if isinstance(kid, str) else "", key)
    return keys


def key_fits(key: jwt.PyJWK, alg: str) -> bool:
    """Whether ``key`` may verify a signature made with ``alg`` (the JWK's own alg, type and curve)."""
    if alg not in ALLOWED_ALGORITHMS:
        return False
    declared = key._jwk_data.get("alg")
    if declared is not None and declared != alg:
        return False
    if alg[:2] in ("RS", "PS"):
        return key.key_type == "RSA"
    return key.key_type == "EC" and key._jwk_data.get("crv") == _CURVE_OF[alg]


class IssuerKeys:
    """The signing keys of one issuer, via its discovery document."""

    def __init__(
        self,
        issuer: IssuerConfig,
        fetch: FetchJson = fetch_json,
        *,
        clock: Callable[[], float] = time.monotonic,
        min_refresh_interval: float = MIN_REFRESH_INTERVAL,
        max_key_age: float = MAX_KEY_AGE,
    ) -> None:
        self.issuer = issuer
        self._fetch = fetch
        self._clock = clock
        self._min_refresh = min_refresh_interval
        self._max_age = max_key_age
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last attempt, successful or not
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def refresh(self) -> None:
        """Fetch discovery + JWKS now (raises KeysUnavailable; old keys are kept on failure)."""
        self._attempted_at = self._clock()
        self.fetches += 1
        ca = self.issuer.certificate_authority
        document = await self._fetch(discovery_url(self.issuer), ca)
        if document.get("issuer") != self.issuer.url:
            raise KeysUnavailable(
                f"discovery document of {self.issuer.url} names issuer {str(document.get('issuer'))[:200]!r}"
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or urlparse(jwks_uri).scheme != "https":
            raise KeysUnavailable(f"discovery document of {self.issuer.url} has no https jwks_uri")
        keys = parse_jwks(await self._fetch(jwks_uri, ca))
        if not keys:
            raise KeysUnavailable(f"JWKS of {self.issuer.url} has no usable signing key")
        self._keys = keys
        self._fetched_at = self._clock()
        log.info("issuer keys loaded", issuer=self.issuer.url, keys=len(keys))

    def _may_refresh(self) -> bool:
        return self._attempted_at is None or self._clock() - self._attempted_at >= self._min_refresh

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except KeysUnavailable as exc:
            log.warning("issuer keys not refreshed", issuer=self.issuer.url, error=str(exc))

    def _lookup(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        if kid is not None:
            key = self._keys.get(kid)
            return key if key is not None and key_fits(key, alg) else None
        fitting = [key for key in self._keys.values() if key_fits(key, alg)]
        return fitting[0] if len(fitting) == 1 else None

    async def key(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        """The key for ``kid`` able to verify ``alg``, refetching (rate-limited) when unknown.

        Raises KeysUnavailable only if no key of this issuer was ever obtained.
        """
        async with self._lock:
            stale = self._fetched_at is None or self._clock() - self._fetched_at >= self._max_age
            if stale and self._may_refresh():
                await self._refresh_quietly()
            if self._fetched_at is None:
                raise KeysUnavailable(f"no signing keys of {self.issuer.url} are available yet")
            found = self._lookup(kid, alg)
            if found is None and kid is not None and kid not in self._keys and self._may_refresh():
                await self._refresh_quietly()
                found = self._lookup(kid, alg)
            return found
