"""The relay's etcd v3 client and watch-fed cache against a real 3-member etcd (upstream etcdmain, TLS,
client certificates): KV, Txn, leases, watches, compaction, and a member killed under it."""

from __future__ import annotations

import asyncio
import filecmp
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from etcd_cluster import EtcdCluster

from clusterconnect.relay.storage.etcd.api import rpc_pb2
from clusterconnect.relay.storage.etcd.cache import PrefixCache
from clusterconnect.relay.storage.etcd.client import (
    Etcd,
    EtcdTLS,
    EtcdUnavailable,
    LeaseLost,
    absent,
    delete_op,
    parse_endpoints,
    prefix_end,
    put_op,
    unchanged_since,
)
from clusterconnect.relay.storage.etcd.lease_keeper import keep_alive

ROOT = Path(__file__).resolve().parent.parent


def run_with(cluster: EtcdCluster, body: Callable[[Etcd], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with cluster.client() as etcd:
            return await body(etcd)

    return asyncio.run(main())


def test_prefix_end_and_endpoints_parse():
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"
    assert parse_endpoints("https://h1:2379, https://[::1]:2380") == ["h1:2379", "[::1]:2380"]
    for bad in ("", "ftp://h:1", "https://h"):
        with pytest.raises(Exception, match="etcd endpoint|names no endpoint"):
            parse_endpoints(bad)


def test_kv_txn_and_create_if_absent(etcd_cluster):
    async def body(etcd: Etcd) -> None:
        await etcd.delete(b"/kv/", prefix=True)
        revision = await etcd.put(b"/kv/a", b"1")
        record = await etcd.get(b"/kv/a")
        assert record is not None and record.value == b"1" and record.mod_revision == revision
        assert await etcd.create(b"/kv/a", b"2") is False
        assert (await etcd.get(b"/kv/a")) == record
        assert await etcd.create(b"/kv/b", b"2") is True
        # optimistic concurrency: a write based on a stale revision is refused
        stale = await etcd.txn([unchanged_since(b"/kv/a", revision - 1)], [put_op(b"/kv/a", b"x")])
        assert not stale.succeeded
        fresh = await etcd.txn([unchanged_since(b"/kv/a", revision)], [put_op(b"/kv/a", b"3"),
                                                                      delete_op(b"/kv/b")])
        assert fresh.succeeded
        values, _ = await etcd.get_prefix(b"/kv/")
        assert [(v.key, v.value) for v in values] == [(b"/kv/a", b"3")]
        assert await etcd.txn([absent(b"/kv/a")], []) is not None
        assert await etcd.delete(b"/kv/", prefix=True) == 1
        assert await etcd.get(b"/kv/a") is None

    run_with(etcd_cluster, body)


def test_a_client_without_a_certificate_is_refused(etcd_cluster):
    async def main() -> None:
        tls = EtcdTLS(etcd_cluster.ca_file.read_bytes())
        async with Etcd(parse_endpoints(etcd_cluster.endpoints), tls, call_timeout=2) as etcd:
            with pytest.raises(EtcdUnavailable):
                await etcd.get(b"/anything")

    asyncio.run(main())


def test_lease_keeps_keys_while_renewed_and_they_go_when_it_stops(etcd_cluster):
    async def body(etcd: Etcd) -> None:
        await etcd.delete(b"/lease/", prefix=True)
        cache = PrefixCache(etcd, b"/lease/")
        async with asyncio.TaskGroup() as group:
            watching = group.create_task(cache.run())
            lease = await etcd.grant(2)
            await etcd.put(b"/lease/kept", b"v", lease)
            keeper = group.create_task(keep_alive(etcd, lease, 2))
            # Renewed: still there after two TTLs (the cache's revision moving past that point is the canary).
            canary_revision = 0
            for i in range(5):
                await asyncio.sleep(1)  # wall-clock time must pass for a TTL to matter
                canary_revision = await etcd.put(b"/lease/canary", str(i).encode())
            assert await cache.wait_for(lambda c: c.revision >= canary_revision, 5)
            assert cache.get(b"/lease/kept") == b"v"
            keeper.cancel()
            assert await cache.wait_for(lambda c: c.get(b"/lease/kept") is None, 8), "lease did not expire"
            # Revoking takes a key away at once.
            other = await etcd.grant(60)
            await etcd.put(b"/lease/revoked", b"v", other)
            assert await cache.wait_for(lambda c: c.get(b"/lease/revoked") == b"v", 5)
            await etcd.revoke(other)
            assert await cache.wait_for(lambda c: c.get(b"/lease/revoked") is None, 5)
            # Keep-alive of a lease that is gone says so.
            with pytest.raises(LeaseLost):
                await keep_alive(etcd, other, 1)
            watching.cancel()

    run_with(etcd_cluster, body)


def test_lease_outlives_a_stalled_event_loop_but_not_a_hung_one(etcd_cluster):
    """The keeper renews from its own thread: a loop blocked for 1.5 TTL (a connect storm's stall) keeps
    the lease, which a keep-alive on the loop lost; a loop blocked past 2 TTL (hung) loses it."""
    async def body(etcd: Etcd) -> None:
        lease = await etcd.grant(2)
        await etcd.put(b"/stall/kept", b"v", lease)
        keeper = asyncio.create_task(keep_alive(etcd, lease, 2))
        try:
            await asyncio.sleep(0)  # the keeper task starts its thread
            # The stimulus, not a wait: nothing on this loop runs for 1.5 TTL.
            time.sleep(3.0)  # noqa: ASYNC251
            assert not keeper.done()
            assert await etcd.get(b"/stall/kept") is not None, "the lease expired while the loop stalled"
            time.sleep(5.0)  # noqa: ASYNC251 -- past 2 TTL: the keeper leaves the lease to expire
            with pytest.raises(LeaseLost, match="event loop unresponsive"):
                await asyncio.wait_for(keeper, 5)
            assert await wait_for_absent(etcd, b"/stall/kept", 8), "a hung loop's lease did not expire"
        finally:
            keeper.cancel()

    run_with(etcd_cluster, body)


async def wait_for_absent(etcd: Etcd, key: bytes, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await etcd.get(key) is None:
            return True
        await asyncio.sleep(0.2)
    return False


def test_cache_lists_again_after_compaction_and_misses_no_delete(etcd_cluster):
    async def body(etcd: Etcd) -> None:
        await etcd.delete(b"/compact/", prefix=True)
        await etcd.put(b"/compact/gone", b"1")
        await etcd.put(b"/compact/stays", b"1")
        cache = PrefixCache(etcd, b"/compact/")
        async with asyncio.TaskGroup() as group:
            watching = group.create_task(cache.run())
            await cache.synced.wait()
            assert cache.lists == 1
            # While the cache is not watching (its stream broken and not yet re-opened), history moves
            # on and is compacted away: it must list again, and see the delete it could not watch.
            seen_revision = cache.revision
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            await etcd.delete(b"/compact/gone")
            await etcd.put(b"/compact/new", b"1")
            head = await etcd.put(b"/compact/stays", b"2")
            await etcd.member().kv.Compact(rpc_pb2.CompactionRequest(revision=head, physical=True))
            assert cache.revision == seen_revision  # frozen while not running
            watching = group.create_task(cache.run())
            assert await cache.wait_for(lambda c: c.lists == 2 and c.revision >= head, 10)
            assert sorted(k for k, _ in cache.items()) == [b"/compact/new", b"/compact/stays"]
            assert cache.get(b"/compact/stays") == b"2"
            watching.cancel()

    run_with(etcd_cluster, body)


def test_member_killed_calls_and_watch_go_on(etcd_cluster, tmp_path):
    cluster = EtcdCluster(tmp_path / "etcd")  # a cluster of its own: one member is killed
    with cluster.running():
        async def body(etcd: Etcd) -> None:
            cache = PrefixCache(etcd, b"/fail/")
            async with asyncio.TaskGroup() as group:
                watching = group.create_task(cache.run())
                await cache.synced.wait()
                current = etcd.member().target
                victim = next(m for m in cluster.members if m.client_url.endswith(current.split(":")[-1]))
                assert victim.process is not None
                victim.process.kill()
                # Writes go on through the other two members (quorum of 3 is 2)...
                revision = await etcd.put(b"/fail/after", b"1")
                assert etcd.member().target != current
                # ...and the cache's watch re-opened elsewhere and sees them.
                assert await cache.wait_for(lambda c: c.get(b"/fail/after") == b"1", 15), "watch did not recover"
                assert cache.revision >= revision and cache.rewatches >= 1
                watching.cancel()

        run_with(cluster, body)


def test_committed_etcd_stubs_match_etcds_protos(tmp_path):
    out = tmp_path / "api"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "etcd_protos.py"), "--out", str(out)], check=True)
    committed = ROOT / "relay" / "storage" / "etcd" / "api"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in committed.iterdir() if p.is_file() and p.suffix in (".py", ".pyi"))
    _, mismatch, errors = filecmp.cmpfiles(out, committed, names, shallow=False)
    assert not mismatch and not errors, f"stale: {mismatch + errors}; run `python scripts/etcd_protos.py`"
