"""User identity on the Store, on both backends: SQLite (one replica) and a real etcd (3 members, TLS).

With etcd, two Store instances on one cluster are two replicas in one process: each has its own
mirror fed by its own watch, as two relay processes would. What one replica writes, the other must
honour: a user added at one logs in and is verified at the other, a credential revoked at one is
refused at the other, a signing key made by both at once is one key, and a grant removed at one ends
the open connections at the other. With SQLite both "replicas" are the one Store (one process): the
same assertions hold.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass

import grpc
import jwt
import pytest
from fake_clock import FakeClock

from clusterconnect.oidc import AuthenticationConfig, Identity, IssuerKeys, Verifier
from clusterconnect.relay.datapath.connections import ConnectionRegistry
from clusterconnect.relay.storage.clusters import ClusterStore
from clusterconnect.relay.storage.etcd.client import Etcd, parse_endpoints
from clusterconnect.relay.storage.kv import Change, EtcdKV, SqliteKV
from clusterconnect.relay.storage.sealing import SealingKey
from clusterconnect.relay.storage.store import Store
from clusterconnect.relay.user_identity.access import AccessStore, DialAuthorizer, Entry
from clusterconnect.relay.user_identity.api import AccessAdmin, IdentityProvider
from clusterconnect.relay.user_identity.issuer import KEYRING, Issuer, SigningKeys
from clusterconnect.relay.user_identity.revocation import RevocationWatch
from clusterconnect.relay.user_identity.users import CredentialInvalid, LoginCodeInvalid, UserStore
from clusterconnect.relay.user_identity.wiring import builtin_issuer_config
from clusterconnect.v1 import identity_pb2, identity_pb2_grpc

URL = "https://relay.example:8445"
READY_SECONDS = 10.0


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request, tmp_path):
    """How to open the two replicas' stores: the SQLite file, or the session's etcd cluster."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("etcd_cluster")


@asynccontextmanager
async def stores(backend, tmp_path) -> AsyncIterator[tuple[Store, Store]]:
    """Two replicas' stores (one, twice, for SQLite), each mirror fed until the block ends."""
    if backend is None:
        store = await Store.open(SqliteKV(tmp_path / "relay.db"))
        try:
            yield store, store
        finally:
            await store.close()
        return
    cleaner = EtcdKV(backend.client())
    await cleaner.commit(Change(delete_prefixes=[""]))  # the etcd cluster is shared by the session
    await cleaner.close()
    opened = [await Store.open(EtcdKV(backend.client())) for _ in range(2)]
    feeds = [asyncio.create_task(store.run()) for store in opened]  # owned here: cancelled below
    try:
        for store in opened:
            await store.ready(READY_SECONDS)
        yield opened[0], opened[1]
    finally:
        for feed in feeds:
            feed.cancel()
        await asyncio.gather(*feeds, return_exceptions=True)
        for store in opened:
            await store.close()


@dataclass
class Replica:
    store: Store
    keys: SigningKeys
    issuer: Issuer
    users: UserStore
    access: AccessStore
    verifier: Verifier
    authorizer: DialAuthorizer
    connections: ConnectionRegistry
    revocations: RevocationWatch


async def replica(store: Store, sealing: SealingKey) -> Replica:
    """What wiring.start builds of one relay, without its network endpoints."""
    clusters = await ClusterStore.open(store)
    keys = await SigningKeys.open(store, sealing, max_age=0)
    issuer = Issuer(URL, URL, keys, 60)
    config = builtin_issuer_config(URL, URL, None)
    verifier = Verifier(AuthenticationConfig(issuers=(config,)), leeway=1.0, keys={
        URL: IssuerKeys(config, issuer.local_fetch(), min_refresh_interval=0.0, max_key_age=60.0)})
    users = await UserStore.open(store)
    access = await AccessStore.open(store, clusters)
    authorizer = DialAuthorizer(access, verifier, users, URL)
    connections = ConnectionRegistry()
    revocations = RevocationWatch(store, clusters, authorizer, connections)
    return Replica(store, keys, issuer, users, access, verifier, authorizer, connections, revocations)


def run(backend, tmp_path, body) -> None:
    async def main() -> None:
        sealing = SealingKey.load_or_create(tmp_path / "sealing.key")  # every replica reads the same one
        async with stores(backend, tmp_path) as (one, two):
            await (await ClusterStore.open(one)).add("dev")  # registered at one replica, seen by both
            first = await replica(one, sealing)
            second = await replica(two, sealing)
            await body(first, second)

    asyncio.run(main())


async def verified(at: Replica, token: str) -> Identity:
    return await at.verifier.verify(token)


def test_a_user_added_at_one_replica_logs_in_and_is_verified_at_the_other(backend, tmp_path):
    async def body(one: Replica, two: Replica) -> None:
        alice, code, _ = await one.users.add("alice", ["dev"])
        user, credential = await two.users.redeem_code(code, "laptop")  # at once: no wait for the mirror
        assert user.uid == alice.uid
        with pytest.raises(LoginCodeInvalid):  # spent at two: refused at one as well
            await one.users.redeem_code(code, "phone")
        assert (await one.users.user_of_credential(credential)).uid == alice.uid
        token, _ = await two.issuer.mint(user.name, user.groups, user.uid)
        identity = await verified(one, token)  # a token of replica two, verified at replica one
        assert (identity.username, identity.groups, identity.uid) == ("alice", ("dev",), alice.uid)
        assert (await one.authorizer.check("dev", token)).allowed

    run(backend, tmp_path, body)


def test_a_credential_revoked_at_one_replica_is_refused_at_the_other(backend, tmp_path):
    async def body(one: Replica, two: Replica) -> None:
        _, code, _ = await one.users.add("bob", [])
        _, laptop = await one.users.redeem_code(code, "laptop")
        _, phone = await one.users.redeem_code((await one.users.new_code("bob"))[0], "phone")
        info = one.users.credential_info(laptop)
        assert info is not None and await one.users.revoke_credential("bob", info.id)
        # Refused at two straight away, even before two's mirror heard of the revocation.
        with pytest.raises(CredentialInvalid, match="not valid"):
            await two.users.user_of_credential(laptop)
        assert await two.users.revoke_own(phone) == "bob"  # logout at two ...
        with pytest.raises(CredentialInvalid):  # ... is the end of that login at one too
            await one.users.user_of_credential(phone)

    run(backend, tmp_path, body)


def test_a_signing_key_made_by_both_replicas_at_once_is_one_key(backend, tmp_path):
    async def body(one: Replica, two: Replica) -> None:
        await one.store.delete(KEYRING)  # as on a first start: no keyring yet
        sealing = SealingKey.load_or_create(tmp_path / "sealing.key")
        clock = FakeClock()
        first, second = await asyncio.gather(SigningKeys.open(one.store, sealing, max_age=3600, clock=clock),
                                             SigningKeys.open(two.store, sealing, max_age=3600, clock=clock))
        assert await _converged(one.store, two.store)
        assert [k.kid for k in first.ring()] == [k.kid for k in second.ring()] and len(first.ring()) == 2
        signing = (await first.current()).kid
        # The key is due at both at once: one rotation, not two (compare-and-swap on the keyring).
        clock.advance(3600)
        after = await asyncio.gather(first.current(), second.current())
        assert await _converged(one.store, two.store)
        assert after[0].kid == after[1].kid != signing
        assert len(first.ring()) == 3 and [k.kid for k in first.ring()] == [k.kid for k in second.ring()]
        # Rotated at one (`keys rotate`), signing at two with the new key, verified at one and two.
        rotated = await first.rotate()
        assert await _eventually(lambda: getattr(second._signing(), "kid", None) == rotated.kid)
        two.issuer.keys = second
        token, _ = await two.issuer.mint("carol", (), "uid-of-carol")
        assert jwt.get_unverified_header(token)["kid"] == rotated.kid
        assert (await verified(one, token)).username == "carol"

    run(backend, tmp_path, body)


def test_a_grant_removed_at_one_replica_ends_the_connections_it_admitted_at_the_other(backend, tmp_path):
    async def body(one: Replica, two: Replica) -> None:
        alice, _, _ = await one.users.add("alice", ["dev"])
        bob, _, _ = await one.users.add("bob", ["ops"])
        await one.access.grant("dev", Entry("user", "alice"))
        await one.access.grant("dev", Entry("user", "bob"))
        hers = await verified(two, (await two.issuer.mint("alice", ("dev",), alice.uid))[0])
        his = await verified(two, (await two.issuer.mint("bob", ("ops",), bob.uid))[0])
        # The grants' own recheck at two has run (it is due a turn after bob's grant arrives): only the
        # revocation's is counted.
        assert await _eventually(lambda: len(two.access.entries("dev")) == 2 and not two.revocations.pending)
        alices = [two.connections.open("dev", hers, None) for _ in range(50)]
        bobs = two.connections.open("dev", his, None)
        reads = _count_reads(two.access)
        await one.access.revoke("dev", Entry("user", "alice"))
        for connection in alices:
            reason = await asyncio.wait_for(connection.wait_revoked(), READY_SECONDS)
            assert reason == "access to cluster dev was revoked at the relay"
        assert not bobs.reason
        assert reads == ["dev"], "the access list is read once per change, not once per connection"
        await one.users.remove("bob")  # a user removed at one: their connections at two end too
        reason = await asyncio.wait_for(bobs.wait_revoked(), READY_SECONDS)
        assert reason == "user bob was removed from the relay"

    run(backend, tmp_path, body)


def test_the_tables_of_an_earlier_version_are_imported_once_by_replicas_starting_together(backend, tmp_path):
    db = tmp_path / "old.db"
    with closing(sqlite3.connect(db)) as old:  # the tables as the previous version wrote them
        old.executescript("""
            CREATE TABLE users (name TEXT PRIMARY KEY, groups TEXT NOT NULL DEFAULT '', created_unix INTEGER NOT NULL,
                uid TEXT NOT NULL DEFAULT '');
            INSERT INTO users VALUES ('erin', 'dev', 1, ''), ('frank', 'ops', 2, 'uid-of-frank');
        """)
        old.commit()

    async def body(one: Replica, two: Replica) -> None:
        first, second = await asyncio.gather(UserStore.open(one.store, db), UserStore.open(two.store, db))
        assert await _converged(one.store, two.store)
        erin_here, erin_there = first.get("erin"), second.get("erin")
        assert erin_here is not None and erin_there is not None
        assert erin_here.uid == erin_there.uid  # one import: one uid made for her, not one per replica
        assert [u.name for u in first.list()] == ["erin", "frank"] and first.get("frank").uid == "uid-of-frank"
        await first.remove("erin")
        assert await _converged(one.store, two.store)  # replica two's mirror has seen the removal
        again = await UserStore.open(two.store, db)  # a later start finds the marker: erin stays removed
        assert again.get("erin") is None

    run(backend, tmp_path, body)


def _count_reads(access: AccessStore) -> list[str]:
    """Record the clusters whose access list ``access`` is asked for from now on."""
    reads: list[str] = []
    entries = access.entries

    def counted(cluster: str) -> list[Entry]:
        reads.append(cluster)
        return entries(cluster)

    access.entries = counted  # type: ignore[method-assign]
    return reads


async def _eventually(condition, timeout: float = READY_SECONDS) -> bool:
    """Wait for a replica's mirror to show another's write (milliseconds with etcd)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110  # the mirror has no event for "this key arrived"
            await asyncio.sleep(0.01)
    return True


async def _converged(one: Store, two: Store) -> bool:
    return await _eventually(lambda: one.list("") == two.list(""))


def test_with_etcd_unreachable_writes_are_answered_unavailable_in_one_line(tmp_path):
    """A replica cut off from etcd: the admin API and logins answer UNAVAILABLE with the store's reason
    (one line), and the relay goes on serving."""
    with socket.socket() as probe:  # a port nobody listens on: every etcd call fails
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"

    async def main() -> None:
        keys_store = await Store.open(SqliteKV(tmp_path / "relay.db"))  # the cluster and keys are not the point
        clusters = await ClusterStore.open(keys_store)
        await clusters.add("dev")
        keys = await SigningKeys.open(keys_store, SealingKey.load_or_create(tmp_path / "sealing.key"), max_age=0)
        issuer = Issuer(URL, URL, keys, 60)
        store = await Store.open(EtcdKV(Etcd(parse_endpoints(dead), None, call_timeout=0.5)))
        users, access = UserStore(store), AccessStore(store, clusters)
        server = grpc.aio.server()
        identity_pb2_grpc.add_AccessAdminServicer_to_server(AccessAdmin(users, access, issuer, "admin"), server)
        identity_pb2_grpc.add_IdentityProviderServicer_to_server(IdentityProvider(users, issuer), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                admin = identity_pb2_grpc.AccessAdminStub(channel)
                provider = identity_pb2_grpc.IdentityProviderStub(channel)
                as_admin = (("authorization", "Bearer admin"),)
                calls = [
                    admin.AddUser(identity_pb2.AddUserRequest(name="alice"), metadata=as_admin),
                    admin.Grant(identity_pb2.AccessChange(cluster="dev", entry=identity_pb2.AccessEntry(user="a")),
                                metadata=as_admin),
                    provider.Login(identity_pb2.LoginRequest(code="0" * 48, device="laptop")),
                    provider.IssueToken(identity_pb2.IssueTokenRequest(),
                                        metadata=(("authorization", "Bearer some-credential"),)),
                ]
                for call in calls:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
                    details = refused.value.details() or ""
                    assert "etcd" in details and "\n" not in details, details
        finally:
            await server.stop(None)
            await store.close()
            await keys_store.close()

    asyncio.run(main())
