"""Which relay replica holds each cluster's agent: replicas and routes in etcd, read from a watch-fed index.

Keys (all under ``/clusterconnect/``):

- ``replicas/<replica>`` -> {"peer": HOST:PORT, "version": ..., "state": "serving"|"draining"}
- ``routes/<cluster>/<replica>`` -> {"session": ID}

Both live on the replica's lease (TTL ~10 s), so a replica that dies takes its routes with it when
the lease runs out, with no one having to clean up. A replica writes a route when an agent says
hello and deletes it when the session ends; heartbeats never write to etcd. Writes are queued and
flushed in transactions of at most 128 operations (etcd's default ``--max-txn-ops``), so 10,000
agents connecting at once cost ~80 writes, not 10,000.

When two replicas both have a route for a cluster (the agent re-homed and the old replica has not
yet seen its session end) the newest route wins: the one written at the higher revision.
This is Teleport's proxy peering (its RFD 69) rather than Rancher's full mesh: no replica tells
every other of every session; each reads the routes it needs from its own index.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from clusterconnect.logs import get_logger
from clusterconnect.relay.storage.etcd.api import rpc_pb2
from clusterconnect.relay.storage.etcd.cache import PrefixCache
from clusterconnect.relay.storage.etcd.client import Etcd, EtcdUnavailable, delete_op, put_op

log = get_logger(__name__)

ROOT = b"/clusterconnect/"
REPLICAS = ROOT + b"replicas/"
ROUTES = ROOT + b"routes/"
# etcd refuses a Txn of more operations than --max-txn-ops, 128 by default.
MAX_TXN_OPS = 128


class ReplicaState(StrEnum):
    SERVING = "serving"
    DRAINING = "draining"


@dataclass(frozen=True)
class Replica:
    name: str
    peer: str
    version: str
    state: ReplicaState


@dataclass(frozen=True)
class Route:
    cluster: str
    replica: str
    session: str
    revision: int


def route_key(cluster: str, replica: str) -> bytes:
    return ROUTES + cluster.encode() + b"/" + replica.encode()


def replica_key(name: str) -> bytes:
    return REPLICAS + name.encode()


class RouteIndex:
    """cluster -> its routes, kept from the ``routes/`` watch (no etcd round trip on a Dial)."""

    def __init__(self) -> None:
        self._routes: dict[str, dict[str, Route]] = {}

    def apply(self, key: bytes, value: bytes | None, revision: int) -> None:
        cluster, _, replica = key[len(ROUTES):].decode(errors="replace").partition("/")
        if not cluster or not replica:
            return  # not a key we wrote: ignore rather than crash on what a peer put there
        if value is None:
            routes = self._routes.get(cluster)
            if routes is not None:
                routes.pop(replica, None)
                if not routes:
                    del self._routes[cluster]
            return
        try:
            session = str(json.loads(value).get("session", ""))
        except (ValueError, AttributeError):
            session = ""
        self._routes.setdefault(cluster, {})[replica] = Route(cluster, replica, session, revision)

    def owner(self, cluster: str) -> Route | None:
        """The newest route of ``cluster`` (the replica that holds its agent now), or None."""
        routes = self._routes.get(cluster)
        if not routes:
            return None
        return max(routes.values(), key=lambda route: route.revision)

    def of_cluster(self, cluster: str) -> list[Route]:
        """Every route of ``cluster``, newest first."""
        return sorted(self._routes.get(cluster, {}).values(), key=lambda route: -route.revision)

    def count(self) -> int:
        return sum(len(routes) for routes in self._routes.values())

    def of_replica(self, replica: str) -> list[Route]:
        return [r for routes in self._routes.values() for r in routes.values() if r.replica == replica]


class Routing:
    """This replica's view of the fleet and its writes to it. ``run()`` belongs to the relay's TaskGroup."""

    def __init__(self, etcd: Etcd, replica: str, lease: int) -> None:
        self._etcd = etcd
        self.replica = replica
        self.lease = lease
        self.routes = RouteIndex()
        self.route_cache = PrefixCache(etcd, ROUTES, on_change=self.routes.apply)
        self.replica_cache = PrefixCache(etcd, REPLICAS)
        self._writes: asyncio.Queue[rpc_pb2.RequestOp] = asyncio.Queue()
        # Writes sent, in transactions (the bench reports writes per second from these).
        self.txns = 0
        self.ops = 0

    async def register(self, peer: str, version: str, state: ReplicaState = ReplicaState.SERVING) -> None:
        body = json.dumps({"peer": peer, "version": version, "state": state.value}).encode()
        await self._etcd.put(replica_key(self.replica), body, self.lease)

    def replicas(self) -> list[Replica]:
        found = []
        for key, value in self.replica_cache.items():
            try:
                data = json.loads(value)
                found.append(Replica(key[len(REPLICAS):].decode(), str(data["peer"]), str(data.get("version", "")),
                                     ReplicaState(data.get("state", "serving"))))
            except (ValueError, KeyError, TypeError):
                continue  # a malformed entry names no usable peer
        return found

    def find_replica(self, name: str) -> Replica | None:
        return next((r for r in self.replicas() if r.name == name), None)

    # -- routes of this replica's agents (queued, flushed in batches) -------------------------------

    def claim(self, cluster: str, session: str) -> None:
        self._writes.put_nowait(put_op(route_key(cluster, self.replica), json.dumps({"session": session}).encode(),
                                       self.lease))

    def release(self, cluster: str) -> None:
        self._writes.put_nowait(delete_op(route_key(cluster, self.replica)))

    async def wait_for_owner(self, cluster: str, timeout: float) -> Route | None:
        """The cluster's route, waiting up to ``timeout`` for one to appear (an agent re-homing)."""
        if (route := self.routes.owner(cluster)) is not None:
            return route
        await self.route_cache.wait_for(lambda _: self.routes.owner(cluster) is not None, timeout)
        return self.routes.owner(cluster)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.route_cache.run())
            group.create_task(self.replica_cache.run())
            group.create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            batch = [await self._writes.get()]
            while len(batch) < MAX_TXN_OPS and not self._writes.empty():
                batch.append(self._writes.get_nowait())
            delay = 0.1
            while True:
                try:
                    await self._flush(batch)
                    break
                except EtcdUnavailable as exc:
                    # Keep the batch: routes are written once etcd answers again (or the lease is
                    # lost meanwhile and the replica drains: then the routes went with the lease).
                    log.warning("route writes failed; retrying", ops=len(batch), reason=str(exc), retry_in=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)

    async def _flush(self, batch: Sequence[rpc_pb2.RequestOp]) -> None:
        # Last write of a key wins within a batch too: a connect and a disconnect of the same
        # cluster in one batch must not be reordered (etcd refuses duplicate keys in one Txn).
        by_key: dict[bytes, rpc_pb2.RequestOp] = {}
        for op in batch:
            key = op.request_put.key if op.HasField("request_put") else op.request_delete_range.key
            by_key.pop(key, None)
            by_key[key] = op
        await self._etcd.txn([], list(by_key.values()))
        self.txns += 1
        self.ops += len(by_key)
