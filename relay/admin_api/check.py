"""The admin role: every Registry and AccessAdmin call carries the relay's admin credential."""

from __future__ import annotations

import hmac

import grpc

from clusterconnect.grpc_options import bearer_from_metadata
from clusterconnect.relay.rpc import UnaryContext


class AdminCheck:
    def __init__(self, admin_credential: str) -> None:
        self._admin = admin_credential.encode()

    async def require(self, context: UnaryContext) -> None:
        """Abort the call unless it carries the admin credential (compared in constant time)."""
        token = bearer_from_metadata(context.invocation_metadata())
        if token is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin credential missing")
        if not hmac.compare_digest(token.encode(), self._admin):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not an admin credential")
