"""The relay's store interface (relay/storage/kv.py) on both implementations: SQLite and a real etcd
(3 members, TLS). The same assertions for both: what holds for one must hold for the other."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing

import pytest

from clusterconnect.errors import Unavailable
from clusterconnect.relay.storage.etcd.client import Etcd, parse_endpoints
from clusterconnect.relay.storage.kv import KV, Change, EtcdKV, SqliteKV, Versioned, create, delete
from clusterconnect.relay.storage.store import Store


def run(open_kv, body) -> None:
    async def main() -> None:
        kv = open_kv()
        try:
            await kv.commit(Change(delete_prefixes=[""]))  # start empty (etcd is shared by the module)
            await body(kv)
        finally:
            await kv.close()

    asyncio.run(main())


def test_put_get_list_and_revisions(open_kv):
    async def body(kv: KV) -> None:
        first = await kv.put("clusters/a", b"1")
        second = await kv.put("clusters/b", b"2")
        assert second > first
        await kv.put("users/a", b"u")
        assert await kv.get("clusters/a") == Versioned(b"1", first)
        assert await kv.get("clusters/none") is None
        assert [k for k, _ in await kv.list("clusters/")] == ["clusters/a", "clusters/b"]
        assert [v.value for _, v in await kv.list("users/")] == [b"u"]
        assert await kv.list("clusters/z") == []
        rewritten = await kv.put("clusters/a", b"3")
        assert rewritten > second and (await kv.get("clusters/a")).value == b"3"

    run(open_kv, body)


def test_commit_is_all_or_nothing(open_kv):
    async def body(kv: KV) -> None:
        assert await create(kv, "keys/signing", b"k1") is True
        assert await create(kv, "keys/signing", b"k2") is False  # create-if-absent: the first one stays
        assert (await kv.get("keys/signing")).value == b"k1"
        current = await kv.get("keys/signing")
        assert current is not None
        await kv.put("grants/c/alice", b"")
        await kv.put("grants/c/bob", b"")
        # An expectation that fails: nothing of the change is written, nothing deleted.
        stale = Change(expect={"keys/signing": current.revision - 1}, put={"keys/signing": b"k3"},
                       delete_prefixes=["grants/c/"])
        assert await kv.commit(stale) == 0
        assert (await kv.get("keys/signing")).value == b"k1"
        assert len(await kv.list("grants/c/")) == 2
        # The same change with the right revision: all of it.
        fresh = Change(expect={"keys/signing": current.revision}, put={"keys/signing": b"k3"},
                       delete_prefixes=["grants/c/"])
        assert await kv.commit(fresh) > 0
        assert (await kv.get("keys/signing")).value == b"k3"
        assert await kv.list("grants/c/") == []
        assert await delete(kv, "keys/signing") is True
        assert await delete(kv, "keys/signing") is False

    run(open_kv, body)


# -- the Store: the KV mirrored in memory (relay/storage/store.py) ------------------------------------


def run_store(open_kv, body) -> None:
    """``body(store, kv)`` with a Store on a fresh, empty KV, its watch (etcd) running and synced."""
    async def main() -> None:
        kv = open_kv()
        await kv.commit(Change(delete_prefixes=[""]))
        store = await Store.open(kv)
        async with asyncio.TaskGroup() as tasks:
            watch = tasks.create_task(store.run())
            try:
                await store.ready(10)
                await body(store, kv)
            finally:
                watch.cancel()
                await store.close()

    asyncio.run(main())


def test_a_write_is_visible_on_return_and_listeners_hear_it(open_kv):
    async def body(store: Store, kv: KV) -> None:
        heard: list[tuple[str, bytes | None]] = []
        store.subscribe("clusters/", lambda key, value: heard.append((key, value)))
        await store.put("clusters/a", b'{"uid": "1"}')
        assert store.get("clusters/a").value == b'{"uid": "1"}'  # no wait: from memory, at once
        assert store.get_json("clusters/a") == {"uid": "1"}
        assert (await kv.get("clusters/a")).revision == store.get("clusters/a").revision
        assert await store.create("clusters/b", b"{}") is True
        assert await store.create("clusters/b", b'{"second": 1}') is False  # create-if-absent
        assert store.get("clusters/b").value == b"{}"
        await store.put("users/x", b"{}")  # another prefix: not heard
        stale = store.get("clusters/a").revision - 1
        assert await store.commit(Change(expect={"clusters/a": stale}, delete=["clusters/a"])) is False
        assert store.get("clusters/a") is not None
        assert await store.commit(Change(delete_prefixes=["clusters/"])) is True
        assert store.list("clusters/") == [] and store.get("users/x") is not None
        assert await store.delete("clusters/a") is False
        assert heard == [("clusters/a", b'{"uid": "1"}'), ("clusters/b", b"{}"), ("clusters/a", None),
                         ("clusters/b", None)]  # (a prefix's keys go in key order)
        assert store.get_json("users/x") == {} and store.get_json("users/none") is None
        await store.put("users/junk", b"\xff not json")
        assert store.get_json("users/junk") is None  # bytes nobody can read are no record

    run_store(open_kv, body)


def test_an_earlier_table_is_imported_once(tmp_path):
    db = tmp_path / "relay.db"
    with closing(sqlite3.connect(db)) as old:
        old.executescript("CREATE TABLE things (name TEXT PRIMARY KEY, size INTEGER);"
                          "INSERT INTO things VALUES ('a', 1), ('b', 2);")
        old.commit()

    def records(rows):
        return {f"things/{row['name']}": str(row["size"]).encode() for row in rows}

    async def main() -> None:
        store = await Store.open(SqliteKV(db))
        assert await store.import_once("things", records) == 2
        assert await store.import_once("things", records) == 0
        assert await store.import_once("absent", records) == 0
        await store.close()
        again = await Store.open(SqliteKV(db))  # the next start finds the marker
        assert [k for k, _ in again.list("things/")] == ["things/a", "things/b"]
        await again.delete("things/a")
        assert await again.import_once("things", records) == 0 and again.get("things/a") is None
        await again.close()

    asyncio.run(main())


def test_two_stores_on_one_etcd_see_each_others_writes(etcd_cluster):
    async def main() -> None:
        first, second = await Store.open(EtcdKV(etcd_cluster.client())), await Store.open(EtcdKV(etcd_cluster.client()))
        await first.kv.commit(Change(delete_prefixes=[""]))
        heard: list[tuple[str, bytes | None]] = []
        second.subscribe("users/", lambda key, value: heard.append((key, value)))
        async with asyncio.TaskGroup() as tasks:
            watches = [tasks.create_task(first.run()), tasks.create_task(second.run())]
            try:
                await first.ready(10)
                await second.ready(10)
                await first.put("users/alice", b'{"uid": "a1"}')
                await wait_for(second, lambda: second.get("users/alice") is not None)
                assert second.get("users/alice") == first.get("users/alice")  # the same revision too
                # Create-if-absent across replicas: the one made first stays.
                assert await second.create("pki/ca", b"one") is True
                assert await first.create("pki/ca", b"two") is False
                assert (await first.read("pki/ca")).value == b"one"
                await first.delete("users/alice")
                await wait_for(second, lambda: second.get("users/alice") is None)
                assert heard == [("users/alice", b'{"uid": "a1"}'), ("users/alice", None)]
            finally:
                for watch in watches:
                    watch.cancel()
        await first.close()
        await second.close()

    asyncio.run(main())


def test_a_write_while_etcd_is_down_raises_unavailable_and_reads_go_on(tmp_path):
    from etcd_cluster import DEVCLUSTER, EtcdCluster

    if not DEVCLUSTER.exists():
        pytest.skip("needs the devcluster binary (make devcluster)")
    cluster = EtcdCluster(tmp_path / "etcd", size=1)

    async def main() -> None:
        store = await Store.open(EtcdKV(Etcd(parse_endpoints(cluster.endpoints), cluster.client_tls(),
                                             call_timeout=1)))
        async with asyncio.TaskGroup() as tasks:
            watch = tasks.create_task(store.run())
            try:
                await store.ready(10)
                await store.put("clusters/a", b"{}")
                cluster.stop()
                with pytest.raises(Unavailable) as raised:
                    await store.put("clusters/b", b"{}")
                message = str(raised.value)
                assert "\n" not in message and message.startswith("the store (etcd) is unreachable"), message
                assert store.get("clusters/a") is not None  # the mirror still answers
            finally:
                watch.cancel()
        await store.close()

    with cluster.running():
        asyncio.run(main())


async def wait_for(store: Store, condition, timeout: float = 10) -> None:
    """Until ``condition()`` holds, checked after each change the store hears of."""
    changed = asyncio.Event()
    store.subscribe("", lambda _key, _value: changed.set())
    async with asyncio.timeout(timeout):
        while True:
            changed.clear()
            if condition():
                return
            await changed.wait()
