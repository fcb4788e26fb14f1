"""The data path's view of the other replicas (tunnel.Router): routes claimed for this replica's agents,
and a Dial for an agent held elsewhere opened as a Forward to its owner."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from clusterconnect.logs import get_logger
from clusterconnect.metadata import DialRefusal
from clusterconnect.relay.datapath.sessions import AgentSession
from clusterconnect.relay.routing.peer import PeerDialer, PeerRefused, RawClientStream
from clusterconnect.relay.routing.routes import Route, Routing
from clusterconnect.streams import PeerGone
from clusterconnect.v1 import tunnel_pb2

log = get_logger(__name__)


class PeerRouter:
    def __init__(self, routing: Routing, dialer: PeerDialer) -> None:
        self.routing = routing
        self.dialer = dialer

    def claim(self, session: AgentSession) -> None:
        self.routing.claim(session.cluster, session.session_id)

    def release(self, cluster: str) -> None:
        self.routing.release(cluster)

    def holder(self, cluster: str, here: bool) -> str:
        if here:
            return self.routing.replica
        # Our own route without a local session is one being released (as in _owner).
        others = (r.replica for r in self.routing.routes.of_cluster(cluster) if r.replica != self.routing.replica)
        return next(others, "")

    def _owner(self, cluster: str, failed: set[tuple[str, int]]) -> tuple[Route, str] | None:
        """The newest route of another replica that we can dial (its registration gives the address),
        leaving out the routes whose owner did not answer. Our own route without a local session is
        one being released (the agent left): never a peer to forward to."""
        for route in self.routing.routes.of_cluster(cluster):
            if route.replica == self.routing.replica or (route.replica, route.revision) in failed:
                continue
            replica = self.routing.find_replica(route.replica)
            if replica is not None:
                return route, replica.peer
        return None

    async def forward(self, cluster: str, traceparent: str, caller: tunnel_pb2.Caller, expires_unix: float | None,
                      local: Callable[[], AgentSession | None], timeout: float
                      ) -> RawClientStream | AgentSession | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Routes whose replica was unreachable (killed, its lease not yet run out): the agent
        # reconnects elsewhere and that replica's newer route is the one to wait for.
        # An owner that answers "not connected" lost the agent a moment ago (it re-homed, and this
        # replica has not seen the new route yet): that route too is left out, and its answer is the
        # client's if no other route shows up in time.
        failed: set[tuple[str, int]] = set()
        stale: PeerRefused | None = None
        serialized = caller.SerializeToString()
        while True:
            if (session := local()) is not None:
                return session
            if (found := self._owner(cluster, failed)) is not None:
                route, peer = found
                try:
                    return await self.dialer.forward(peer, cluster, traceparent, serialized, expires_unix)
                except PeerGone as exc:
                    log.info("relay replica unreachable; waiting for the cluster's next route", cluster=cluster,
                             replica=route.replica, reason=str(exc))
                    failed.add((route.replica, route.revision))
                    continue
                except PeerRefused as exc:
                    if exc.reason != DialRefusal.AGENT_NOT_CONNECTED:
                        raise
                    failed.add((route.replica, route.revision))
                    stale = exc
                    continue
            left = deadline - loop.time()
            if left <= 0:
                if stale is not None:
                    raise stale
                return None
            await self.routing.route_cache.wait_for(
                lambda _: local() is not None or self._owner(cluster, failed) is not None, left)
