"""Verify an OIDC JWT against the configured issuers and map its claims to a Kubernetes identity.

Order of checks in :meth:`Verifier.verify`:

1. The token is a compact JWS (three base64url parts, JSON header and payload) whose header names an
   allowed asymmetric algorithm (RS*, PS*, ES*; never ``none`` or HMAC) and no ``crit`` extension.
2. Its unverified ``iss`` is exactly a configured issuer URL; otherwise :class:`UnknownIssuer`.
3. The issuer's key for ``kid`` (discovery + JWKS, cached, refetched on an unknown kid at most every
   10 s) verifies the signature (PyJWT + cryptography).
4. ``exp`` is required; ``exp``/``nbf``/``iat`` are checked with ``leeway`` seconds of clock skew;
   ``iss`` exactly; ``aud`` contains one of the issuer's audiences.
5. ``claimValidationRules``; then the claim mappings. A mapped username or group beginning with
   ``system:`` is refused: the caller's identity is impersonated by a proxy that may impersonate
   anyone, so an issuer must never be able to name a built-in Kubernetes identity.

Every error message is safe to log and to show to the caller: it never quotes the token.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from clusterconnect.errors import Unauthenticated
from clusterconnect.logs import get_logger
from clusterconnect.oidc.config import AuthenticationConfig, IssuerConfig
from clusterconnect.oidc.keys import ALLOWED_ALGORITHMS, FetchJson, IssuerKeys, KeysUnavailable, fetch_json

log = get_logger(__name__)

DEFAULT_LEEWAY = 60.0
RESERVED_PREFIX = "system:"
MAX_TOKEN_LENGTH = 16 * 1024


class TokenError(Unauthenticated):
    """The token is not acceptable; the message is safe to log and to return to the caller."""


class NotAJWT(TokenError):
    """The token is not a compact JWS at all."""


class UnknownIssuer(TokenError):
    """A well-formed JWT whose ``iss`` is not configured (``issuer`` is the unverified value)."""

    def __init__(self, issuer: str | None) -> None:
        super().__init__("token issuer is not trusted")
        self.issuer = issuer


@dataclass(frozen=True)
class Identity:
    """A verified caller, as kube-apiserver's user.Info."""

    username: str
    groups: tuple[str, ...] = ()
    uid: str | None = None
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    issuer: str = ""
    # The raw ``sub`` claim: with ``issuer``, what names the caller across services whose claim
    # mappings differ (the relay binds a connection to it; the auth proxy compares it).
    subject: str = ""
    # The raw ``uid`` claim, if the token has one. The relay's built-in tokens do: the user's id, new
    # when a name is removed and added again, so that an old token of the name is someone else.
    token_uid: str = ""
    # The token's ``exp`` (Unix seconds); None when not from a token. Not part of who the caller is.
    expires_unix: float | None = field(default=None, compare=False)


# Who a verified caller is across services whose claim mappings differ: issuer, raw ``sub`` and raw
# ``uid`` claim (never mapped or prefixed names). The relay binds a connection to it; the auth proxy
# holds every request on that connection to it.
Principal = tuple[str, str, str]


def principal(identity: Identity) -> Principal:
    return identity.issuer, identity.subject, identity.token_uid


def _b64decode(part: str) -> bytes:
    if not part or any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in part):
        raise NotAJWT("token is not a JWT")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise NotAJWT("token is not a JWT") from None


def parse_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a compact JWS, without any verification; raises NotAJWT."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise NotAJWT("token is too long")
    parts = token.split(".")
    if len(parts) != 3 or not parts[2]:
        raise NotAJWT("token is not a JWT")
    try:
        header = json.loads(_b64decode(parts[0]))
        claims = json.loads(_b64decode(parts[1]))
    except (ValueError, UnicodeDecodeError):
        raise NotAJWT("token is not a JWT") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise NotAJWT("token is not a JWT")
    _b64decode(parts[2])
    return header, claims


def unverified_issuer(token: str) -> str | None:
    """The ``iss`` a token claims (unverified!), or None if it is not a JWT or has no string iss."""
    try:
        _, claims = parse_unverified(token)
    except NotAJWT:
        return None
    iss = claims.get("iss")
    return iss if isinstance(iss, str) else None


def _string_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TokenError(f"claim {what} must be a string or a list of strings")


def map_claims(issuer: IssuerConfig, claims: Mapping[str, Any]) -> Identity:
    """Apply claimValidationRules and claimMappings to verified claims (pure; raises TokenError)."""
    for rule in issuer.claim_validation_rules:
        if claims.get(rule.claim) != rule.required_value:
            raise TokenError(f"claim {rule.claim} does not have the required value")

    mapping = issuer.username
    username = claims.get(mapping.claim)
    if not isinstance(username, str) or not username:
        raise TokenError(f"username claim {mapping.claim} is missing or not a string")
    if mapping.claim == "email" and "email_verified" in claims and claims["email_verified"] is not True:
        raise TokenError("email is not verified (email_verified is not true)")
    username = mapping.prefix + username

    groups: list[str] = []
    if issuer.groups is not None:
        groups = [issuer.groups.prefix + g for g in _string_list(claims.get(issuer.groups.claim), issuer.groups.claim)]

    uid = None
    if issuer.uid is not None:
        value = claims.get(issuer.uid)
        if value is not None:
            if not isinstance(value, str):
                raise TokenError(f"uid claim {issuer.uid} is not a string")
            uid = value or None

    extra: dict[str, tuple[str, ...]] = {}
    for item in issuer.extra:
        values = [v for v in _string_list(claims.get(item.claim), item.claim) if v]
        if values:
            extra[item.key] = tuple(values)

    for name in [username, *groups]:
        if name.startswith(RESERVED_PREFIX):
            raise TokenError("token maps to a reserved system: user or group")
    for value in [username, *groups, uid or "", *(v for vs in extra.values() for v in vs)]:
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise TokenError("token maps to a name with control characters")
    subject = claims.get("sub")
    token_uid = claims.get("uid")
    expires = claims.get("exp")
    return Identity(username=username, groups=tuple(dict.fromkeys(groups)), uid=uid, extra=extra, issuer=issuer.url,
                    subject=subject if isinstance(subject, str) else "",
                    token_uid=token_uid if isinstance(token_uid, str) else "",
                    expires_unix=float(expires) if isinstance(expires, int | float) else None)


class Verifier:
    """Verifies tokens of every issuer in one AuthenticationConfiguration."""

    def __init__(
        self,
        config: AuthenticationConfig,
        *,
        fetch: FetchJson = fetch_json,
        leeway: float = DEFAULT_LEEWAY,
        keys: Mapping[str, IssuerKeys] | None = None,
    ) -> None:
        self.config = config
        self.leeway = leeway
        self.keys = dict(keys) if keys is not None else {i.url: IssuerKeys(i, fetch) for i in config.issuers}

    @property
    def issuer_urls(self) -> tuple[str, ...]:
        return tuple(i.url for i in self.config.issuers)

    async def prefetch(self) -> None:
        """Load every issuer's keys now (best effort: failures are logged and retried on use)."""
        for keys in self.keys.values():
            try:
                await keys.refresh()
            except KeysUnavailable as exc:
                log.warning("issuer keys not loaded", issuer=keys.issuer.url, error=str(exc))

    async def verify(self, token: str) -> Identity:
        header, unverified = parse_unverified(token)
        iss = unverified.get("iss")
        issuer = self.config.issuer(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise UnknownIssuer(iss if isinstance(iss, str) else None)

        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            raise TokenError("token signing algorithm is not allowed")
        if "crit" in header:
            raise TokenError("token has critical header extensions")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("token kid is not a string")

        try:
            key = await self.keys[issuer.url].key(kid, alg)
        except KeysUnavailable as exc:
            raise TokenError(f"cannot verify tokens of this issuer now: {exc}") from None
        if key is None:
            raise TokenError("token is signed with an unknown key")

        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=list(issuer.audiences),
                issuer=issuer.url,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud"], "verify_signature": True},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token has expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise TokenError("token audience is not accepted") from None
        except jwt.InvalidSignatureError:
            raise TokenError("token signature is invalid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"token has no {exc.claim} claim") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"token is invalid ({type(exc).__name__})") from None
        return map_claims(issuer, claims)
