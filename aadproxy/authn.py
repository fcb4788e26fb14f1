"""Who sent a request, and what to send upstream for it.

An :class:`Authenticator` looks at a request's headers (already stripped of hop-by-hop headers,
see headers.py) and answers either :class:`Forward` with the complete header list to send to the
apiserver, or :class:`Reject` with a status and message. The forwarder never sends a request
upstream without a ``Forward``.

Two implementations: :class:`TokenPassthrough` (below, the default) and
:class:`~clusterconnect.aadproxy.oidc_authn.OIDCAuthenticator` (``--authentication-config``), which
verifies the JWT, drops ``Authorization`` and every ``Impersonate-*`` header and returns
``Forward(headers + own Authorization + Impersonate-User/Group/Uid/Extra-*)``.

Forwarded requests' upstream connections never present a TLS client certificate (apiserver.py),
because kube-apiserver authenticates a client certificate *before* a bearer token; a proxy
identity carried in the TLS layer would silently replace the caller's token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from clusterconnect.aadproxy.headers import Header, values
from clusterconnect.oidc import Principal


@dataclass(frozen=True)
class Subject:
    """A user as the audit event names it (audit.py): the Kubernetes username and groups."""

    username: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Forward:
    """Send the request upstream with exactly these end-to-end headers."""

    headers: list[Header]
    # The caller's principal (issuer, raw sub and uid claims) when this proxy verified the request
    # itself (OIDC mode); None when the apiserver authenticates it (token passthrough, ServiceAccount tokens).
    caller: Principal | None = None
    # For the audit event, not part of the decision: the verified caller, and whom the proxy's own
    # credential impersonates for it (both None when the apiserver authenticates the request).
    user: Subject | None = field(default=None, compare=False)
    impersonated: Subject | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Reject:
    """Answer ``status`` with a Kubernetes Status carrying ``message``; forward nothing."""

    status: int
    message: str
    # Why, for the metrics (clusterconnect_aadproxy_authentication_failures_total): a short fixed word;
    # not part of the decision (two refusals with the same answer are equal).
    reason: str = field(default="credential", compare=False)
    # The caller, when its token verified before the refusal (audit event; not part of the decision).
    user: Subject | None = field(default=None, compare=False)


class Authenticator(Protocol):
    async def authenticate(self, headers: Sequence[Header]) -> Forward | Reject: ...


class ConnectionAuthenticator(Authenticator, Protocol):
    def bound_to(self, caller: Principal | None) -> Authenticator:
        """The authenticator of one connection, opened by ``caller`` as the relay verified it (its
        principal; None: unverified). Only an authenticator that verifies requests can hold them to it."""
        ...


def bearer_token(headers: Sequence[Header]) -> bytes | Reject:
    """The token of the request's single ``Authorization: Bearer <token>`` header, or a Reject."""
    found = values(headers, b"authorization")
    if not found:
        # The usual cause: a kubeconfig user with a client certificate, whose TLS ends at the client
        # proxy, so the certificate never crosses the tunnel (docs/identity.md). Say what works instead.
        return Reject(401, "Unauthorized: no Authorization header (expected a bearer token; a client certificate"
                           " cannot cross the tunnel: use a token, `clusterconnect login` or a built-in user)")
    if len(found) > 1:
        return Reject(401, "Unauthorized: more than one Authorization header")
    scheme, _, token = found[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return Reject(401, "Unauthorized: only Bearer authorization is accepted")
    token = token.strip()
    if not token:
        return Reject(401, "Unauthorized: empty bearer token")
    return token


class TokenPassthrough:
    """Forward a request that carries a bearer token, unchanged; the apiserver authenticates it.

    The proxy only checks that exactly one non-empty bearer token is present, so nothing anonymous
    reaches the apiserver through the tunnel. Because the apiserver authenticates the caller's own
    token, the caller's ``Impersonate-*`` headers are forwarded too: the apiserver authorizes
    impersonation for that token exactly as it would for a direct connection, so passing them
    grants nothing new. (The OIDC authenticator must strip them: there the apiserver sees the
    proxy's identity, not the caller's.)
    """

    async def authenticate(self, headers: Sequence[Header]) -> Forward | Reject:
        token = bearer_token(headers)
        if isinstance(token, Reject):
            return token
        return Forward(headers=list(headers))

    def bound_to(self, caller: Principal | None) -> Authenticator:
        # This proxy cannot tell who a token is: the apiserver authenticates every request itself,
        # and the client proxy's mutual TLS keeps other local users off the tunnel (docs/identity.md).
        return self
