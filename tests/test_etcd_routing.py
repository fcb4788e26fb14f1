"""Routes of relay replicas in a real etcd (3 members, TLS): claimed on a replica's lease, read from each
replica's watch-fed index, newest wins, gone with the lease, written in batches."""

from __future__ import annotations

import asyncio
import math

from etcd_cluster import EtcdCluster

from clusterconnect.relay.routing.routes import ROUTES, ReplicaState, RouteIndex, Routing, route_key
from clusterconnect.relay.storage.etcd.client import Etcd


def _owner(routing: Routing, cluster: str) -> str | None:
    route = routing.routes.owner(cluster)
    return route.replica if route is not None else None


def run(cluster: EtcdCluster, body) -> None:
    async def main() -> None:
        async with cluster.client() as etcd:
            await etcd.delete(b"/clusterconnect/", prefix=True)
            await body(etcd)

    asyncio.run(main())


def test_route_index_ignores_malformed_entries_and_prefers_the_newest():
    index = RouteIndex()
    index.apply(ROUTES + b"no-replica-part", b"{}", 5)
    index.apply(ROUTES + b"c1/a", b"not json", 6)
    index.apply(ROUTES + b"c1/b", b'{"session": "s2"}', 9)
    assert index.owner("c1").replica == "b" and index.owner("c1").session == "s2"
    index.apply(ROUTES + b"c1/b", None, 10)
    assert index.owner("c1").replica == "a"
    index.apply(ROUTES + b"c1/a", None, 11)
    assert index.owner("c1") is None and index.count() == 0


def test_replicas_see_each_others_routes_and_the_newest_wins(etcd_cluster):
    async def body(etcd: Etcd) -> None:
        a = Routing(etcd, "relay-a", await etcd.grant(10))
        b = Routing(etcd, "relay-b", await etcd.grant(10))
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(a.run()), group.create_task(b.run())]
            await a.register("127.0.0.1:1", "v1")
            await b.register("127.0.0.1:2", "v1", ReplicaState.DRAINING)
            a.claim("c1", "s1")
            route = await b.wait_for_owner("c1", 5)
            assert route is not None and route.replica == "relay-a" and route.session == "s1"
            # The agent re-homes to b: b's newer route wins on both replicas, before a has released.
            b.claim("c1", "s2")
            assert await a.route_cache.wait_for(lambda _: _owner(a, "c1") == "relay-b", 5)
            a.release("c1")
            assert await b.route_cache.wait_for(lambda _: len(b.routes.of_replica("relay-a")) == 0, 5)
            assert b.routes.owner("c1").replica == "relay-b"
            assert await a.replica_cache.wait_for(lambda _: len(a.replicas()) == 2, 5)
            assert {r.name: r.state for r in a.replicas()} == {"relay-a": ReplicaState.SERVING,
                                                               "relay-b": ReplicaState.DRAINING}
            # A route that appears later is waited for (a Dial during a re-home).
            waiting = group.create_task(a.wait_for_owner("c2", 5))
            b.claim("c2", "s3")
            route = await waiting
            assert route is not None and route.replica == "relay-b"
            for task in tasks:
                task.cancel()

    run(etcd_cluster, body)


def test_routes_go_with_the_lease_of_a_dead_replica(etcd_cluster):
    async def body(etcd: Etcd) -> None:
        dead = Routing(etcd, "relay-dead", await etcd.grant(2))
        alive = Routing(etcd, "relay-alive", await etcd.grant(30))
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(dead.run()), group.create_task(alive.run())]
            await dead.register("127.0.0.1:9", "v1")
            for i in range(5):
                dead.claim(f"gone-{i}", "s")
            assert await alive.route_cache.wait_for(lambda _: alive.routes.count() == 5, 5)
            # The dead replica never renews its 2 s lease (as after kill -9): routes and registration go.
            assert await alive.route_cache.wait_for(lambda _: alive.routes.count() == 0, 10)
            assert await alive.replica_cache.wait_for(lambda _: alive.find_replica("relay-dead") is None, 5)
            for task in tasks:
                task.cancel()

    run(etcd_cluster, body)


def test_a_burst_of_claims_is_written_in_few_transactions(etcd_cluster):
    async def body(etcd: Etcd) -> None:
        routing = Routing(etcd, "relay-burst", await etcd.grant(30))
        async with asyncio.TaskGroup() as group:
            task = group.create_task(routing.run())
            for i in range(1000):
                routing.claim(f"burst-{i}", f"s{i}")
            routing.claim("burst-0", "newer")  # the same key twice in a burst: the last one wins
            assert await routing.route_cache.wait_for(lambda _: routing.routes.count() == 1000, 20)
            values, _ = await etcd.get_prefix(ROUTES)
            assert len(values) == 1000
            assert routing.routes.owner("burst-0").session == "newer"
            assert routing.ops <= 1001
            assert routing.txns <= math.ceil(1001 / 128) + 1
            assert (await etcd.get(route_key("burst-7", "relay-burst"))) is not None
            task.cancel()

    run(etcd_cluster, body)
