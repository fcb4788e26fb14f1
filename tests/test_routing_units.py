"""Pure logic of forwarding between relay replicas: the Forward's metadata as the owner reads it, and which
route a Dial is forwarded along (newest first; never this replica's own, never one that failed)."""

from __future__ import annotations

import asyncio
import json

import pytest

from clusterconnect import metadata as md
from clusterconnect.relay.datapath import tunnel as relay_tunnel
from clusterconnect.relay.datapath.forwarded import ForwardRequest, read_forward_metadata
from clusterconnect.relay.routing.forwarding import PeerRouter
from clusterconnect.relay.routing.routes import REPLICAS, Routing, replica_key, route_key
from clusterconnect.v1 import tunnel_pb2


def test_the_owner_reads_the_verified_caller_and_expiry_from_the_forward():
    caller = tunnel_pb2.Caller(issuer="https://relay.example", subject="alice", uid="u1")
    request = read_forward_metadata(((md.CLUSTER, "prod"), (md.CALLER_BIN, caller.SerializeToString()),
                                     (md.EXPIRES, "1700000000.5"), (md.TRACEPARENT, "00-ab")))
    assert request == ForwardRequest("prod", caller, 1700000000.5, "00-ab")
    unverified = read_forward_metadata(((md.CLUSTER, "prod"), (md.CALLER_BIN, b"")))
    assert isinstance(unverified, ForwardRequest)
    assert unverified.caller == tunnel_pb2.Caller() and unverified.expires_unix is None


def test_a_malformed_forward_is_refused_with_one_line():
    caller = tunnel_pb2.Caller(subject="alice").SerializeToString()
    cases = {
        (): "missing x-clusterconnect-cluster metadata",
        ((md.CLUSTER, "prod"),): "missing x-clusterconnect-caller-bin metadata",
        ((md.CLUSTER, "prod"), (md.CALLER_BIN, b"\xff\xff\xff")): "x-clusterconnect-caller-bin is not a serialized"
                                                                 " Caller",
        ((md.CLUSTER, "prod"), (md.CALLER_BIN, caller), (md.EXPIRES, "soon")): "x-clusterconnect-expires is not a"
                                                                              " number of seconds",
        ((md.CLUSTER, "prod"), (md.CALLER_BIN, caller), (md.EXPIRES, "nan")): "x-clusterconnect-expires is not a"
                                                                             " number of seconds",
        # two callers: which one would the agent get?
        ((md.CLUSTER, "prod"), (md.CALLER_BIN, caller), (md.CALLER_BIN, caller)):
            "missing x-clusterconnect-caller-bin metadata",
    }
    for metadata, message in cases.items():
        assert read_forward_metadata(metadata) == message, metadata


def _router(replica: str) -> PeerRouter:
    routing = Routing(None, replica, lease=1)  # type: ignore[arg-type]  # no etcd: the index is fed by hand
    return PeerRouter(routing, dialer=None)  # type: ignore[arg-type]


def _register(router: PeerRouter, name: str, peer: str, revision: int) -> None:
    router.routing.replica_cache._values[replica_key(name)] = (
        json.dumps({"peer": peer, "version": "v", "state": "serving"}).encode(), revision)


def test_a_dial_follows_the_newest_route_of_another_replica_it_can_dial():
    router = _router("relay-a")
    routes = router.routing.routes
    assert router._owner("prod", set()) is None
    routes.apply(route_key("prod", "relay-b"), b'{"session": "s1"}', 10)
    assert router._owner("prod", set()) is None  # relay-b not registered (yet): no address to dial
    _register(router, "relay-b", "10.0.0.2:8446", 5)
    _register(router, "relay-c", "10.0.0.3:8446", 6)
    route, peer = router._owner("prod", set())
    assert (route.replica, peer) == ("relay-b", "10.0.0.2:8446")
    # the agent re-homed to relay-c: its newer route wins, though relay-b's has not gone yet
    routes.apply(route_key("prod", "relay-c"), b'{"session": "s2"}', 12)
    assert router._owner("prod", set())[1] == "10.0.0.3:8446"
    # relay-c did not answer: the next newest
    assert router._owner("prod", {("relay-c", 12)})[1] == "10.0.0.2:8446"
    # this replica's own route (a session that just ended here) is never a peer to forward to
    routes.apply(route_key("prod", "relay-a"), b'{"session": "s3"}', 14)
    assert router._owner("prod", set())[1] == "10.0.0.3:8446"
    assert [r.replica for r in routes.of_cluster("prod")] == ["relay-a", "relay-c", "relay-b"]
    assert REPLICAS in replica_key("x")


def _tunnel() -> relay_tunnel.Tunnel:
    return relay_tunnel.Tunnel(None, None, 5, authorizer=None, agent_auth=None,  # type: ignore[arg-type]
                               connections=None)  # type: ignore[arg-type]  # the gate needs none of them


def test_a_starting_replica_holds_dials_and_agents_until_it_registered(monkeypatch: pytest.MonkeyPatch):
    """Its server listens before it is in etcd: a Dial then would be refused "not connected", an agent's session
    would get no route. Both wait for the router; a replica that does not register in time refuses."""
    async def scenario() -> None:
        single = _tunnel()
        assert await single._until_routable()  # a relay on SQLite has no router to wait for
        replica = _tunnel()
        replica.expect_router()
        waiting = asyncio.create_task(replica._until_routable())
        for _ in range(3):  # the loop went round: an open gate would have let it through on the first
            await asyncio.sleep(0)
        assert not waiting.done()
        replica.set_router(_router("relay-a"))  # type: ignore[arg-type]
        assert await asyncio.wait_for(waiting, 1)
        replica.set_router(None)  # stopping: drained, its server already stopped; nothing waits any more
        assert await replica._until_routable()
        monkeypatch.setattr(relay_tunnel, "ROUTABLE_TIMEOUT", 0.01)
        late = _tunnel()
        late.expect_router()
        assert not await late._until_routable()

    asyncio.run(scenario())
