"""The relay's readiness (clusterconnect.health): its store answers, and it is not draining.

The store is read for real (etcd: a linearizable read; SQLite: a query), not only its mirror: a
replica cut off from etcd must stop getting new clients and agents from its balancer. A draining
replica is alive but refuses new agent sessions, so it is not ready either.
"""

from __future__ import annotations

import grpc

from clusterconnect import health
from clusterconnect.relay.datapath.tunnel import Tunnel
from clusterconnect.relay.storage.store import Store

# Any key will do: the read proves the store answers, whatever it holds.
PROBE_KEY = "health/probe"


def register(tunnel: Tunnel, store: Store, server: grpc.aio.Server) -> None:
    async def store_answers() -> str | None:
        if not store.synced:
            return "the store's watch is being re-opened (etcd)"
        await store.read(PROBE_KEY)  # Unavailable (one line) when it does not answer
        return None

    async def not_draining() -> str | None:
        return tunnel.draining

    health.check("store", store_answers)
    health.check("draining", not_draining)
    health.add_to_server(server)
