"""The relay's store interface (relay/storage/kv.py) on both implementations: SQLite and a real etcd
(3 members, TLS). The same assertions for both: what holds for one must hold for the other."""

from __future__ import annotations

import asyncio

import pytest

from clusterconnect.relay.storage.kv import KV, Change, EtcdKV, SqliteKV, Versioned, create, delete


@pytest.fixture(params=["sqlite", "etcd"])
def open_kv(request, tmp_path):
    """A function that opens a fresh, empty store of the parametrized kind inside the running loop."""
    if request.param == "sqlite":
        return lambda: SqliteKV(tmp_path / "relay.db")
    cluster = request.getfixturevalue("etcd_cluster")

    return lambda: EtcdKV(cluster.client())


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
