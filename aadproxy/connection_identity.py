"""One identity per connection: every request on a tunnelled connection authenticates as its caller.

The relay verifies the token of each Dial and passes the identity it verified (its principal:
issuer and raw ``sub`` and ``uid`` claims; or "unverified") to the agent, which passes it here as the
first message of the Serve stream. Without this check, anyone who could send bytes through another user's connection (a
shared host's 127.0.0.1 port) would reach the cluster as themselves, past the relay's access list.
In OIDC mode, per request, after the request's own token verified:

- a connection the relay verified: the request's issuer, subject and uid claim must be exactly
  the caller's (a built-in user added again under an old name has a new uid);
  a ServiceAccount token (passed through, not verified here) is not that caller either;
- a connection the relay could not verify (a passthrough cluster, an issuer the relay does not
  know): the first identity verified here binds it, and later requests must be that identity.

Anything else is answered 403 and nothing is forwarded. Token passthrough mode cannot verify a
token, so it holds nothing (``TokenPassthrough.bound_to``): there the apiserver authenticates each
request and the client proxy's mutual TLS protects the local port.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from clusterconnect.aadproxy.authn import Authenticator, Forward, Reject
from clusterconnect.aadproxy.headers import Header
from clusterconnect.oidc import Principal

FORBIDDEN = "Forbidden: this connection was opened by another identity at the relay"


class HeldToCaller:
    """The decisions of ``inner`` (which verifies tokens), held to one connection's caller."""

    def __init__(self, inner: Authenticator, caller: Principal | None) -> None:
        self.inner = inner
        self.caller = caller  # None until the first verified request of an unverified connection

    async def authenticate(self, headers: Sequence[Header]) -> Forward | Reject:
        decision = await self.inner.authenticate(headers)
        if isinstance(decision, Reject):
            return decision
        if decision.caller is None:  # a ServiceAccount token, for the apiserver to authenticate
            return decision if self.caller is None else self._refuse(decision)
        if self.caller is None:
            self.caller = decision.caller
        elif decision.caller != self.caller:
            return self._refuse(decision)
        return decision

    @staticmethod
    def _refuse(decision: Forward) -> Reject:
        # The request's own identity stays in the request event (user), next to why it was refused.
        structlog.contextvars.bind_contextvars(auth="rejected", reason="connection-identity")
        return Reject(403, FORBIDDEN, "connection-identity", user=decision.user)
