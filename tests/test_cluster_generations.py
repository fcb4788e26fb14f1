"""Grants die with their cluster (#11 point 3): the access list is keyed by a unique id of the cluster's
registration and deleted with it, so a cluster added again, even within the same second, starts empty.

Unit: the relay's stores in-process, with the clock stopped (the old key, created_unix, counted whole
seconds). End to end: the real CLI against a real relay, whose database then holds no trace of the grant.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from contextlib import closing
from types import SimpleNamespace

from chain import Chain
from test_user_identity import _relay_parts, mint

from clusterconnect.relay.storage import clusters as cluster_storage
from clusterconnect.relay.storage.clusters import ClusterStore
from clusterconnect.relay.storage.kv import SqliteKV
from clusterconnect.relay.storage.store import Store
from clusterconnect.relay.user_identity.access import GRANTS, AccessStore, DialAuthorizer, Entry


def test_a_cluster_added_again_in_the_same_second_starts_empty(tmp_path, monkeypatch):
    now = time.time()
    monkeypatch.setattr(cluster_storage, "time", SimpleNamespace(time=lambda: now))  # one second for all
    clusters, _, issuer, verifier, users, access = _relay_parts(tmp_path)
    authorizer = DialAuthorizer(access, verifier, users, issuer.url)
    alice, bob = asyncio.run(users.add("alice", []))[0], asyncio.run(users.add("bob", []))[0]
    alice_token = mint(issuer, "alice", (), alice.uid)
    first = asyncio.run(clusters.add("dev"))
    asyncio.run(access.grant("dev", Entry("user", "alice")))
    assert asyncio.run(authorizer.check("dev", alice_token)).allowed
    asyncio.run(clusters.remove("dev"))
    second = asyncio.run(clusters.add("dev"))
    assert second.created_unix == first.created_unix and second.uid != first.uid
    assert access.entries("dev") == []
    asyncio.run(access.grant("dev", Entry("user", "bob")))
    refused = asyncio.run(authorizer.check("dev", alice_token))
    assert not refused.allowed and 'user "alice" may not reach cluster dev' in refused.message
    assert asyncio.run(authorizer.check("dev", mint(issuer, "bob", (), bob.uid))).allowed
    assert f"{GRANTS}{second.uid}/user/bob" in [key for key, _ in access.store.list(GRANTS)]


def test_grants_of_an_earlier_version_move_to_the_cluster_they_belong_to(tmp_path):
    db = tmp_path / "relay.db"
    with closing(sqlite3.connect(db)) as old:  # the tables as the previous version wrote them
        old.executescript("""
            CREATE TABLE clusters (name TEXT PRIMARY KEY, credential_sha256 TEXT NOT NULL,
                created_unix INTEGER NOT NULL, last_seen_unix INTEGER NOT NULL DEFAULT 0,
                agent_version TEXT NOT NULL DEFAULT '', kubernetes_version TEXT NOT NULL DEFAULT '');
            CREATE TABLE cluster_access (cluster TEXT NOT NULL, cluster_created_unix INTEGER NOT NULL,
                kind TEXT NOT NULL, name TEXT NOT NULL, PRIMARY KEY (cluster, cluster_created_unix, kind, name));
            INSERT INTO clusters (name, credential_sha256, created_unix) VALUES ('dev', '', 200), ('prod', '', 300);
            INSERT INTO cluster_access VALUES ('dev', 200, 'group', 'dev'), ('dev', 100, 'user', 'gone'),
                ('prod', 300, 'user', 'alice');
        """)
        old.commit()
    store = asyncio.run(Store.open(SqliteKV(db)))
    clusters = asyncio.run(ClusterStore.open(store))
    access = asyncio.run(AccessStore.open(store, clusters, db))
    assert access.entries("dev") == [Entry("group", "dev")]  # the grant of an older registration is dropped
    assert access.entries("prod") == [Entry("user", "alice")]
    assert len({clusters.get("dev").uid, clusters.get("prod").uid}) == 2
    assert len(store.list(GRANTS)) == 2
    # Imported once: a second start (the old table is still there) finds the marker and adds nothing.
    asyncio.run(access.revoke("prod", Entry("user", "alice")))
    reopened = asyncio.run(Store.open(SqliteKV(db)))
    again = asyncio.run(AccessStore.open(reopened, asyncio.run(ClusterStore.open(reopened)), db))
    assert again.entries("prod") == [] and again.entries("dev") == [Entry("group", "dev")]


def test_removing_a_cluster_deletes_its_access_list(tmp_path):
    chain = Chain(tmp_path, tmp_path / "unused.kubeconfig")
    try:
        chain.start_relay()
        chain.add_cluster()
        chain.cli("clusters", "grant", chain.cluster, "--user", "mallory-was-here")
        chain.admin("remove", chain.cluster)
        chain.add_cluster()
        listed = chain.cli("clusters", "access", chain.cluster)
        assert "access list is empty" in listed.stdout, listed.stdout
        with closing(sqlite3.connect(chain.relay_data / "relay.db")) as db:
            tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                rows = db.execute(f"SELECT * FROM {table}").fetchall()
                assert "mallory-was-here" not in repr(rows), f"the removed cluster's grant is still in {table}"
    finally:
        chain.stop_all()
