"""The cluster registry and the enrollment records on the Store (relay/storage/clusters.py,
relay/agent_identity/enrollment.py), on SQLite and on the real 3-member etcd: the same assertions."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing

import pytest

from clusterconnect.relay.agent_identity.enrollment import EnrollmentStore
from clusterconnect.relay.agent_identity.pki import AgentIdentity
from clusterconnect.relay.storage.clusters import SEEN_BATCH, AlreadyExists, ClusterStore, grants_prefix
from clusterconnect.relay.storage.kv import Change, EtcdKV, SqliteKV
from clusterconnect.relay.storage.store import Store


def run_store(open_kv, body) -> None:
    async def main() -> None:
        kv = open_kv()
        await kv.commit(Change(delete_prefixes=[""]))  # the etcd is shared by the session
        store = await Store.open(kv)
        async with asyncio.TaskGroup() as tasks:
            watch = tasks.create_task(store.run())
            try:
                await store.ready(10)
                await body(store)
            finally:
                watch.cancel()
                await store.close()

    asyncio.run(main())


def test_remove_takes_the_access_list_of_that_registration_only(open_kv):
    async def body(store: Store) -> None:
        clusters = await ClusterStore.open(store)
        first = await clusters.add("dev")
        with pytest.raises(AlreadyExists):
            await clusters.add("dev")
        await clusters.add("prod")
        prod = clusters.get("prod")
        await store.put(grants_prefix(first.uid) + "user/alice", b"{}")
        await store.put(grants_prefix(prod.uid) + "group/ops", b"{}")
        assert await clusters.remove("dev") and clusters.get("dev") is None
        assert store.list(grants_prefix(first.uid)) == []
        assert [k for k, _ in store.list("cluster-grants/")] == [grants_prefix(prod.uid) + "group/ops"]
        second = await clusters.add("dev")
        assert second.uid != first.uid and not await clusters.remove("none")
        assert [c.name for c in clusters.list()] == ["dev", "prod"]

    run_store(open_kv, body)


def test_last_seen_is_recorded_and_never_brings_a_removed_cluster_back(open_kv):
    async def body(store: Store) -> None:
        clusters = await ClusterStore.open(store)
        added = await clusters.add("dev")
        await clusters.record_seen([("dev", (1234, "v1", "v1.37", added.uid))])
        seen = clusters.get("dev")
        assert (seen.last_seen_unix, seen.agent_version, seen.kubernetes_version, seen.uid) == \
            (1234, "v1", "v1.37", added.uid)
        await clusters.remove("dev")
        await clusters.record_seen([("dev", (1300, "v1", "v1.37", added.uid))])
        assert clusters.get("dev") is None and store.get("clusters/dev") is None
        again = await clusters.add("dev")  # registered again: the old registration's hello is not its own
        await clusters.record_seen([("dev", (1400, "v1", "v1.37", added.uid))])
        assert clusters.get("dev") == again

    run_store(open_kv, body)


def test_hellos_are_written_in_batches_and_a_removed_cluster_does_not_stop_the_rest(open_kv):
    async def body(store: Store) -> None:
        clusters = await ClusterStore.open(store)
        names = [f"c{i}" for i in range(SEEN_BATCH * 2 + 5)]
        for name in names:
            await clusters.add(name)
        commits = []
        real_commit = store.commit

        async def counted(change):
            if change.put:  # the hellos' writes (not the remove below)
                commits.append(len(change.put))
            return await real_commit(change)

        store.commit = counted  # type: ignore[method-assign]
        for name in names:
            clusters.note_seen(name, 1000, "v2", "v1.37")
        await clusters.remove("c3")  # after its hello was queued: it must not come back, the others go in
        async with asyncio.TaskGroup() as group:
            writer = group.create_task(clusters.record_seen_forever())
            try:
                deadline = asyncio.get_running_loop().time() + 10
                while not all((r := clusters.get(n)) is not None and r.agent_version == "v2" for n in names[4:]):
                    assert asyncio.get_running_loop().time() < deadline, "hellos not written"
                    await asyncio.sleep(0.02)
            finally:
                writer.cancel()
        assert clusters.get("c3") is None
        assert commits == [SEEN_BATCH - 1, SEEN_BATCH, 5], commits  # c3 left out of the first batch

    run_store(open_kv, body)


def test_a_join_token_works_once_across_two_replicas(etcd_cluster):
    async def main() -> None:
        one, two = Store(EtcdKV(etcd_cluster.client())), Store(EtcdKV(etcd_cluster.client()))
        await one.kv.commit(Change(delete_prefixes=[""]))
        async with asyncio.TaskGroup() as tasks:
            watches = [tasks.create_task(one.run()), tasks.create_task(two.run())]
            try:
                await one.ready(10)
                await two.ready(10)
                at_one, at_two = await EnrollmentStore.open(one), await EnrollmentStore.open(two)
                token, _ = await at_one.create_join_token("dev")
                # Used at replica 2 at once (read from etcd, not its mirror), and only once, at either.
                assert await at_two.consume_join_token("dev", token)
                assert not await at_one.consume_join_token("dev", token)
                recorded = asyncio.Event()
                one.subscribe("agent-certificates/", lambda _key, _value: recorded.set())
                await at_two.record_certificate("dev", 7, 2**40)
                identity = AgentIdentity("dev", 7, 2**40)
                async with asyncio.timeout(10):
                    await recorded.wait()  # replica 1's mirror has it: its agent port accepts the certificate
                assert at_one.accepts(identity)
                await at_one.revoke("dev")
                assert not at_one.accepts(identity)
            finally:
                for watch in watches:
                    watch.cancel()
        await one.close()
        await two.close()

    asyncio.run(main())


def test_rows_of_earlier_versions_are_imported_once(tmp_path):
    db = tmp_path / "relay.db"
    with closing(sqlite3.connect(db)) as old:  # the tables as the version before the Store wrote them
        old.executescript("""
            CREATE TABLE clusters (name TEXT PRIMARY KEY, credential_sha256 TEXT NOT NULL,
                created_unix INTEGER NOT NULL, last_seen_unix INTEGER NOT NULL DEFAULT 0,
                agent_version TEXT NOT NULL DEFAULT '', kubernetes_version TEXT NOT NULL DEFAULT '',
                uid TEXT NOT NULL DEFAULT '');
            INSERT INTO clusters VALUES ('dev', '', 200, 300, 'v1', 'v1.37', 'u-dev'), ('old', '', 100, 0, '', '', '');
            CREATE TABLE agent_join_tokens (token_sha256 TEXT PRIMARY KEY, cluster TEXT NOT NULL,
                expires_unix INTEGER NOT NULL, used_unix INTEGER NOT NULL DEFAULT 0);
            INSERT INTO agent_join_tokens VALUES ('ab12', 'dev', 99999999999, 0);
            CREATE TABLE agent_certificates (cluster TEXT PRIMARY KEY, current_serial TEXT NOT NULL,
                current_not_after_unix INTEGER NOT NULL, previous_serial TEXT NOT NULL DEFAULT '',
                previous_not_after_unix INTEGER NOT NULL DEFAULT 0);
            INSERT INTO agent_certificates VALUES ('dev', 'a', 99999999999, '9', 99999999999);
        """)
        old.commit()

    async def main() -> None:
        store = await Store.open(SqliteKV(db))
        clusters = await ClusterStore.open(store)
        enrollment = await EnrollmentStore.open(store)
        dev = clusters.get("dev")
        assert (dev.uid, dev.created_unix, dev.last_seen_unix, dev.agent_version) == ("u-dev", 200, 300, "v1")
        assert clusters.get("old").uid  # a row of a version before uids got one
        assert enrollment.accepts(AgentIdentity("dev", 0xA, 2**40))
        assert enrollment.accepts(AgentIdentity("dev", 9, 2**40))  # the previous certificate too
        assert store.get_json("join-tokens/ab12") == {"cluster": "dev", "expires_unix": 99999999999, "used_unix": 0}
        await clusters.remove("old")
        await store.close()
        again = await Store.open(SqliteKV(db))  # the next start: nothing imported again
        assert [c.name for c in (await ClusterStore.open(again)).list()] == ["dev"]
        await again.close()

    asyncio.run(main())
