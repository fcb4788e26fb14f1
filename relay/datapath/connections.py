"""The relay's open client connections, each with its cluster and the caller the relay verified for it.

A Dial registers its connection here once it is authorized, before it asks the agent for a stream,
and leaves when it ends. The registry is what lets revocation end what is open (docs/identity.md): a
change of a user or an access list in the store, made at this replica or another, re-checks the
connections it concerns (``revoke_where``, from relay/user_identity/revocation.py), and a connection
dialled with a verified token ends when the token expires. (``clusters remove``
ends the cluster's agent session, which drops its connections: sessions.py.)
It also enforces the per-cluster and per-identity limits of concurrent connections.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

from clusterconnect import errors
from clusterconnect.oidc import Identity, Principal, principal

# Defaults of the limits (0 = unlimited). A cluster's connections are all kubectl processes of all
# its users, watches included; 4096 leaves room for busy clusters while bounding what one cluster
# can take of the relay's file descriptors and memory. One identity (a person, or one CI account)
# rarely needs more than a few dozen; 1024 stops a runaway loop long before the cluster's limit.
DEFAULT_MAX_PER_CLUSTER = 4096
DEFAULT_MAX_PER_IDENTITY = 1024


class TooManyConnections(errors.ResourceExhausted):
    """A Dial over a connection limit; the message names the limit."""


class OpenConnection:
    """One client connection through the relay. ``caller`` is None when the relay did not verify the
    token (a passthrough cluster, an issuer it does not know); such a connection has no expiry."""

    def __init__(self, cluster: str, caller: Identity | None, expires_unix: float | None) -> None:
        self.cluster = cluster
        self.caller = caller
        self.expires_unix = expires_unix
        self.reason = ""
        self._revoked = asyncio.Event()

    def revoke(self, reason: str) -> None:
        """End the connection (the Dial handler waits for this in ``wait_revoked``); the first reason stays."""
        if not self._revoked.is_set():
            self.reason = reason
            self._revoked.set()

    async def wait_revoked(self) -> str:
        """Returns, with the reason as one line, once the connection was revoked or its token expired."""
        if self.expires_unix is None:
            await self._revoked.wait()
            return self.reason
        try:
            async with asyncio.timeout(max(0.0, self.expires_unix - time.time())):
                await self._revoked.wait()
        except TimeoutError:
            self.revoke("the token it was opened with has expired")
        return self.reason


class ConnectionRegistry:
    """Every open client connection of this relay process, by cluster and caller."""

    def __init__(self, max_per_cluster: int = DEFAULT_MAX_PER_CLUSTER,
                 max_per_identity: int = DEFAULT_MAX_PER_IDENTITY) -> None:
        self.max_per_cluster = max_per_cluster
        self.max_per_identity = max_per_identity
        self._open: set[OpenConnection] = set()
        self._per_cluster: Counter[str] = Counter()
        self._per_identity: Counter[Principal] = Counter()

    def __len__(self) -> int:
        return len(self._open)

    def open(self, cluster: str, caller: Identity | None, expires_unix: float | None) -> OpenConnection:
        """Register a connection (``close`` it when it ends); TooManyConnections over a limit.
        Unverified callers have no identity the relay could count: the per-cluster limit bounds them."""
        if self.max_per_cluster and self._per_cluster[cluster] >= self.max_per_cluster:
            raise TooManyConnections(f"cluster {cluster} has {self.max_per_cluster} open connections at the relay,"
                                     " its limit (--max-connections-per-cluster)")
        over_identity = caller is not None and self._per_identity[principal(caller)] >= self.max_per_identity
        if caller is not None and self.max_per_identity and over_identity:
            raise TooManyConnections(f'user "{caller.username}" has {self.max_per_identity} open connections at the'
                                     " relay, its limit (--max-connections-per-identity)")
        connection = OpenConnection(cluster, caller, expires_unix)
        self._open.add(connection)
        self._per_cluster[cluster] += 1
        if caller is not None:
            self._per_identity[principal(caller)] += 1
        return connection

    def close(self, connection: OpenConnection) -> None:
        if connection not in self._open:
            return
        self._open.discard(connection)
        self._per_cluster[connection.cluster] -= 1
        if not self._per_cluster[connection.cluster]:
            del self._per_cluster[connection.cluster]
        if connection.caller is not None:
            key = principal(connection.caller)
            self._per_identity[key] -= 1
            if not self._per_identity[key]:
                del self._per_identity[key]

    def revoke_where(self, refusal: Callable[[OpenConnection], str | None], cluster: str | None = None) -> int:
        """End every open connection (of ``cluster``, or all) for which ``refusal`` gives a reason;
        how many were ended."""
        ended = 0
        for connection in list(self._open):
            if cluster is not None and connection.cluster != cluster:
                continue
            reason = refusal(connection)
            if reason is not None:
                connection.revoke(reason)
                ended += 1
        return ended
