"""OIDC authentication with Kubernetes impersonation (``--authentication-config``).

The rule, per request (headers already without hop-by-hop ones, so a ``Connection``-named header is
gone before this runs and cannot remove what is set here):

1. Exactly one credential: one ``Authorization: Bearer`` header, or (only when there is none) one
   ``base64url.bearer.authorization.k8s.io.<token>`` entry in ``Sec-WebSocket-Protocol``, which the
   apiserver accepts too. None, two, or one of each: 401.
2. The token must be a JWT. Its claimed ``iss`` (unverified, used only to route) decides:
   - one of the ServiceAccount issuers (``--serviceaccount-issuer``, default: the cluster's own,
     read from the apiserver's discovery, plus the legacy ``kubernetes/serviceaccount``): the request
     is forwarded untouched, as in token passthrough mode: the apiserver verifies the token and
     authorizes any ``Impersonate-*`` headers for it;
   - a configured OIDC issuer: the token must verify (clusterconnect.oidc), else 401;
   - anything else (another issuer, no ``iss``, not a JWT at all): 401, nothing is forwarded.
3. For a verified OIDC caller: ``Authorization``, every ``Impersonate-*`` header and the bearer entries
   of ``Sec-WebSocket-Protocol`` are removed; the proxy's own ServiceAccount token is sent as
   ``Authorization``, with ``Impersonate-User``/``-Group``/``-Uid``/``-Extra-*`` of the caller.
4. If the caller itself sent ``Impersonate-*`` headers (``kubectl --as``/``--as-group``), each
   requested user, group, uid and extra value is checked with a SubjectAccessReview for the verified
   caller (verb ``impersonate``, as kube-apiserver checks it); all allowed: that identity is
   forwarded instead; any refused: 403 naming what was refused.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Collection, Sequence
from urllib.parse import quote, unquote

import structlog

from clusterconnect.aadproxy.authn import Authenticator, Forward, Reject, Subject, bearer_token
from clusterconnect.aadproxy.connection_identity import HeldToCaller
from clusterconnect.aadproxy.headers import Header
from clusterconnect.aadproxy.kubeapi import AccessReviewer, ApiError, ResourceAttributes
from clusterconnect.logs import get_logger
from clusterconnect.oidc import (
    Identity,
    NotAJWT,
    Principal,
    TokenError,
    UnknownIssuer,
    Verifier,
    principal,
    unverified_issuer,
)

log = get_logger(__name__)

LEGACY_SERVICEACCOUNT_ISSUER = "kubernetes/serviceaccount"
WEBSOCKET_BEARER_PREFIX = b"base64url.bearer.authorization.k8s.io."
IMPERSONATE_PREFIX = b"impersonate-"
EXTRA_PREFIX = b"impersonate-extra-"


def _split_protocols(value: bytes) -> list[bytes]:
    return [item.strip() for item in value.split(b",") if item.strip()]


def _websocket_tokens(headers: Sequence[Header]) -> list[bytes]:
    found = []
    for name, value in headers:
        if name.lower() == b"sec-websocket-protocol":
            found += [p for p in _split_protocols(value) if p.lower().startswith(WEBSOCKET_BEARER_PREFIX)]
    return found


def _decode_websocket_token(protocol: bytes) -> bytes | None:
    encoded = protocol[len(WEBSOCKET_BEARER_PREFIX):]
    try:
        token = base64.urlsafe_b64decode(encoded + b"=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        return None
    return token.strip() or None


def extract_token(headers: Sequence[Header]) -> bytes | Reject:
    """The request's single bearer credential (Authorization or WebSocket subprotocol), or a Reject."""
    authorization = [v for n, v in headers if n.lower() == b"authorization"]
    websocket = _websocket_tokens(headers)
    if len(authorization) + len(websocket) > 1:
        return Reject(401, "Unauthorized: more than one credential in the request")
    if websocket:
        token = _decode_websocket_token(websocket[0])
        if token is None:
            return Reject(401, "Unauthorized: malformed bearer token in Sec-WebSocket-Protocol")
        return token
    return bearer_token([(n.lower(), v) for n, v in headers])


def without_credentials(headers: Sequence[Header]) -> list[Header]:
    """``headers`` without Authorization, any Impersonate-* and WebSocket bearer entries (names lowercased)."""
    kept: list[Header] = []
    for name, value in headers:
        name = name.lower()
        if name == b"authorization" or name.startswith(IMPERSONATE_PREFIX):
            continue
        if name == b"sec-websocket-protocol":
            protocols = [p for p in _split_protocols(value) if not p.lower().startswith(WEBSOCKET_BEARER_PREFIX)]
            if not protocols:
                continue
            value = b", ".join(protocols)
        kept.append((name, value))
    return kept


def identity_headers(identity: Identity) -> list[Header]:
    """The impersonation headers that make the apiserver see ``identity``."""
    out: list[Header] = [(b"impersonate-user", identity.username.encode())]
    out += [(b"impersonate-group", group.encode()) for group in identity.groups]
    if identity.uid:
        out.append((b"impersonate-uid", identity.uid.encode()))
    for key, values in sorted(identity.extra.items()):
        name = EXTRA_PREFIX + quote(key, safe="").encode()
        out += [(name, value.encode()) for value in values]
    return out


class ImpersonationRequest:
    """What a caller's own ``Impersonate-*`` headers ask for (kubectl --as / --as-group / --as-uid)."""

    def __init__(self, headers: Sequence[Header]) -> None:
        self.users: list[str] = []
        self.groups: list[str] = []
        self.uids: list[str] = []
        self.extra: dict[str, list[str]] = {}
        self.unknown: list[str] = []
        for name, value in headers:
            name = name.lower()
            if not name.startswith(IMPERSONATE_PREFIX):
                continue
            text = value.decode("utf-8", "replace").strip()
            if name == b"impersonate-user":
                self.users.append(text)
            elif name == b"impersonate-group":
                self.groups.append(text)
            elif name == b"impersonate-uid":
                self.uids.append(text)
            elif name.startswith(EXTRA_PREFIX):
                key = unquote(name[len(EXTRA_PREFIX):].decode("latin-1")).lower()
                self.extra.setdefault(key, []).append(text)
            else:
                self.unknown.append(name.decode("latin-1"))

    @property
    def present(self) -> bool:
        return bool(self.users or self.groups or self.uids or self.extra or self.unknown)

    def problem(self) -> str | None:
        if self.unknown:
            return "unknown impersonation header"
        if len(self.users) != 1 or not self.users[0]:
            return "impersonation needs exactly one non-empty Impersonate-User"
        if len(self.uids) > 1:
            return "more than one Impersonate-Uid"
        if not all(self.groups) or any(not k or not all(v) for k, v in self.extra.items()):
            return "empty impersonation value"
        return None

    def attributes(self) -> list[ResourceAttributes]:
        """What must be allowed, as kube-apiserver's impersonation filter checks it."""
        user = self.users[0]
        found: list[ResourceAttributes] = []
        parts = user.split(":")
        if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"] and parts[2] and parts[3]:
            found.append(ResourceAttributes("serviceaccounts", parts[3], namespace=parts[2]))
        else:
            found.append(ResourceAttributes("users", user))
        found += [ResourceAttributes("groups", group) for group in self.groups]
        found += [ResourceAttributes("uids", uid, group="authentication.k8s.io") for uid in self.uids]
        for key, values in self.extra.items():
            found += [
                ResourceAttributes("userextras", value, group="authentication.k8s.io", subresource=key)
                for value in values
            ]
        return found

    def identity(self, issuer: str) -> Identity:
        return Identity(
            username=self.users[0],
            groups=tuple(self.groups),
            uid=self.uids[0] if self.uids else None,
            extra={k: tuple(v) for k, v in self.extra.items()},
            issuer=issuer,
        )


def subject(identity: Identity) -> Subject:
    return Subject(identity.username, tuple(identity.groups))


def _bind_audit(**values: object) -> None:
    """Identity fields for this request's log events (the forwarder's per-request event carries them)."""
    structlog.contextvars.bind_contextvars(**values)


class OIDCAuthenticator:
    """Verify OIDC callers and impersonate them; pass ServiceAccount tokens through (see module doc)."""

    def __init__(
        self,
        verifier: Verifier,
        own_token: Callable[[], str | None],
        reviewer: AccessReviewer | None,
        serviceaccount_issuers: Collection[str],
    ) -> None:
        self.verifier = verifier
        self.own_token = own_token
        self.reviewer = reviewer
        self.serviceaccount_issuers = frozenset(serviceaccount_issuers) - set(verifier.issuer_urls)

    def _reject(self, status: int, message: str, reason: str) -> Reject:
        _bind_audit(auth="rejected", user=None, groups=None, reason=reason)
        return Reject(status, message, reason)

    async def authenticate(self, headers: Sequence[Header]) -> Forward | Reject:
        raw = extract_token(headers)
        if isinstance(raw, Reject):
            return self._reject(raw.status, raw.message, "credential")
        try:
            token = raw.decode("ascii")
        except UnicodeDecodeError:
            return self._reject(401, "Unauthorized: token is not a JWT", "malformed")

        issuer = unverified_issuer(token)
        if issuer is not None and issuer in self.serviceaccount_issuers:
            _bind_audit(auth="serviceaccount-passthrough", user=None, groups=None, reason=None)
            return Forward(headers=list(headers))

        try:
            identity = await self.verifier.verify(token)
        except UnknownIssuer:
            return self._reject(401, "Unauthorized: the token's issuer is not trusted by this cluster", "issuer")
        except NotAJWT:
            return self._reject(401, "Unauthorized: token is not a JWT", "malformed")
        except TokenError as exc:
            return self._reject(401, f"Unauthorized: {exc}", "invalid")

        requested = ImpersonationRequest(headers)
        effective = identity
        if requested.present:
            denied = await self._check_impersonation(identity, requested)
            if denied is not None:
                _bind_audit(auth="oidc", user=identity.username, groups=list(identity.groups), reason="impersonation")
                return Reject(403, denied, "impersonation", user=subject(identity))
            effective = requested.identity(identity.issuer)

        own = self.own_token()
        if not own:
            refused = self._reject(503, "auth proxy has no credential of its own for the apiserver", "no-credential")
            return Reject(refused.status, refused.message, refused.reason, user=subject(identity))
        _bind_audit(
            auth="oidc",
            user=identity.username,
            groups=list(identity.groups),
            impersonated_user=effective.username if effective is not identity else None,
            reason=None,
        )
        forward = without_credentials(headers)
        forward.append((b"authorization", b"Bearer " + own.encode()))
        forward += identity_headers(effective)
        return Forward(headers=forward, caller=principal(identity), user=subject(identity),
                       impersonated=subject(effective))

    def bound_to(self, caller: Principal | None) -> Authenticator:
        return HeldToCaller(self, caller)

    async def _check_impersonation(self, identity: Identity, requested: ImpersonationRequest) -> str | None:
        """None if every requested identity part may be impersonated by ``identity``; else a 403 message."""
        problem = requested.problem()
        if problem is not None:
            return f"Forbidden: {problem}"
        if self.reviewer is None:
            return "Forbidden: impersonation is not enabled on this auth proxy"
        for attributes in requested.attributes():
            try:
                allowed = await self.reviewer.allowed(
                    identity.username, identity.groups, identity.uid, identity.extra, attributes
                )
            except (ApiError, OSError, TimeoutError) as exc:
                log.warning("impersonation check failed", error=str(exc)[:200])
                return "Forbidden: cannot check impersonation permission now"
            if not allowed:
                return (
                    f'Forbidden: user "{identity.username}" cannot impersonate {attributes.describe()} '
                    f"(auth proxy SubjectAccessReview denied verb impersonate)"
                )
        return None
