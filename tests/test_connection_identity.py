"""A connection carries one identity, and revocation ends what is open (issue #11, points 1, 2, 4, 6).

Real processes against the devcluster: a relay (8 s access tokens, 1 s clock skew, small connection
limits), an auth proxy in OIDC mode trusting the relay's built-in issuer, an agent without warm
streams (so every connection goes through a DialRequest; the warm path is the default everywhere
else). The tests Dial the relay themselves (ClientTunnel.Dial over TLS, as any client may) and speak
HTTP/1.1 on the stream, so one connection can carry requests with another user's token — what a
local user could do through someone else's client proxy port. The apiserver's audit log is the judge
of who reached it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import h11
import jwt
import pytest
from chain import wait_until
from identities import (
    POD_READER,
    builtin_issuer_chain,
    grant_role,
    login_with_code,
)
from test_oidc_verifier import ISSUER, FakeIssuer
from test_oidc_verifier import authenticator as oidc_authenticator
from test_user_identity import _relay_parts as relay_parts

from clusterconnect import credentials as tokens
from clusterconnect import metadata as md
from clusterconnect.aadproxy.authn import Forward, Reject, TokenPassthrough
from clusterconnect.aadproxy.connection_identity import FORBIDDEN
from clusterconnect.grpc_options import CHANNEL_OPTIONS, bearer, grpc_target
from clusterconnect.relay.datapath.connections import ConnectionRegistry
from clusterconnect.relay.user_identity.access import DialAuthorizer, Entry
from clusterconnect.relay.user_identity.revocation import RevocationWatch
from clusterconnect.streams import GrpcClientStream, PeerGone
from clusterconnect.v1 import tunnel_pb2_grpc

NS = "connid"  # namespace and group of the users on the access list
PROXY_NS = "clusterconnect-connid"
LIFETIME = 8  # the relay's access token lifetime (s); with 1 s skew a connection lives at most 9 s
MAX_PER_IDENTITY = 3
MAX_PER_CLUSTER = 6


@pytest.fixture(scope="module")
def relay(devcluster, tmp_path_factory):
    state = tmp_path_factory.mktemp("connection-identity")
    devcluster.create_namespace(NS)
    grant_role(devcluster, NS, "pod-reader", POD_READER, "connid-pod-reader", groups=[NS])
    relay_args = ["--access-token-lifetime", str(LIFETIME), "--clock-skew-seconds", "1",
                  "--max-connections-per-identity", str(MAX_PER_IDENTITY),
                  "--max-connections-per-cluster", str(MAX_PER_CLUSTER)]
    with builtin_issuer_chain(devcluster, state, PROXY_NS, agent_args=("--warm-streams", "0"), log_level="debug",
                              relay_args=relay_args) as chain:
        chain.add_cluster("idle")  # registered, passthrough, never connected
        chain.cli("clusters", "grant", chain.cluster, "--group", NS)
        users = {}
        for name, groups in (("alice", [NS]), ("bob", []), ("carol", [NS]), ("dave", []), ("erin", [NS]),
                             ("frank", [NS])):
            login_with_code(chain, name, groups, state / name)
            users[name] = state / name
        chain.cli("clusters", "grant", chain.cluster, "--user", "dave")
        yield type("Relay", (), {"chain": chain, "devcluster": devcluster, "users": users})


def fresh_token(relay, user: str) -> str:
    """A new access token of ``user`` (full lifetime ahead)."""
    state = relay.users[user]
    token, _ = tokens.refresh(tokens.load(state, tokens.list_logins(state)[0]))
    return token


class Connection:
    """One ClientTunnel.Dial stream, spoken to as an HTTP/1.1 connection."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self.call = call
        self.stream = GrpcClientStream(call)
        self.http = h11.Connection(h11.CLIENT)

    async def opened(self) -> bool:
        return any(key == md.OPEN for key, _ in await self.call.initial_metadata() or ())

    async def refusal(self) -> tuple[grpc.StatusCode, str, str]:
        """The status the Dial ended with: code, message and the relay's clusterconnect-reason."""
        reason = dict(await self.call.trailing_metadata() or ()).get(md.REASON, "")
        return await self.call.code(), await self.call.details(), reason

    async def get(self, token: str, path: str) -> int:
        """One request on this connection with ``token``; its status."""
        await self.stream.send(self.http.send(h11.Request(method="GET", target=path, headers=[
            ("host", "kubernetes"), ("authorization", f"Bearer {token}")])) + self.http.send(h11.EndOfMessage()))
        status = 0
        while True:
            event = self.http.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive()
                if not data:
                    raise PeerGone("the connection ended before the response")
                self.http.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
                    self.http.start_next_cycle()  # else the server closes the connection after this response
                return status
            elif isinstance(event, h11.ConnectionClosed):
                raise PeerGone("the connection closed")


@asynccontextmanager
async def relay_channel(relay) -> AsyncIterator[tunnel_pb2_grpc.ClientTunnelStub]:
    chain = relay.chain
    credentials = grpc.ssl_channel_credentials(chain.relay_ca.read_bytes())
    async with grpc.aio.secure_channel(grpc_target(chain.relay_url), credentials, options=CHANNEL_OPTIONS) as channel:
        yield tunnel_pb2_grpc.ClientTunnelStub(channel)


def dial(stub, token: str, cluster: str = "dev") -> Connection:
    return Connection(stub.Dial(metadata=((md.CLUSTER, cluster), bearer(token))))


def audit_events(relay, marker: str) -> list[dict]:
    return [json.loads(line) for line in relay.devcluster.audit_log.read_text(errors="replace").splitlines()
            if marker in line]


def pod_path(marker: str) -> str:
    return f"/api/v1/namespaces/{NS}/pods/{marker}"


def _no_connection_open(relay) -> None:
    relay_process = relay.chain.processes["relay"]
    wait_until(lambda: relay_process.stats()["open_connections"] == 0, 10, "the relay's connections to end",
               relay_process, 0.1)


# ---- point 1: one identity per connection ---------------------------------------------------------


def test_another_users_token_on_a_connection_is_refused_and_never_reaches_the_apiserver(relay):
    alice, bob, carol = fresh_token(relay, "alice"), fresh_token(relay, "bob"), fresh_token(relay, "carol")
    as_bob, as_carol, canary = (f"{who}-{secrets.token_hex(4)}" for who in ("bob", "carol", "canary"))

    async def main() -> None:
        async with relay_channel(relay) as stub:
            connection = dial(stub, alice)
            assert await connection.opened()
            assert await connection.get(alice, pod_path("none-" + secrets.token_hex(2))) == 404  # alice reads pods
            # bob is not on the access list, carol is: neither may use a connection alice opened (a refusal
            # closes the connection, so each gets one of its own)
            assert await connection.get(bob, pod_path(as_bob)) == 403
            connection = dial(stub, alice)
            assert await connection.get(carol, pod_path(as_carol)) == 403
            # alice's own requests still go through: the canary
            connection = dial(stub, alice)
            assert await connection.get(alice, pod_path(canary)) == 404
            connection.call.cancel()

    asyncio.run(main())
    # The audit log is written in order: once the canary is in it, the refused requests would be too.
    wait_until(lambda: audit_events(relay, canary), 10, "the canary's audit event")
    assert audit_events(relay, as_bob) == [] and audit_events(relay, as_carol) == []
    assert audit_events(relay, canary)[-1]["impersonatedUser"]["username"] == "alice"
    log = (relay.chain.state_dir / "logs" / "aadproxy.log").read_text()
    refused = [json.loads(line) for line in log.splitlines() if '"connection-identity"' in line]
    assert {event.get("user") for event in refused} == {"bob", "carol"}, refused


# ---- point 2: revocation ends what is open --------------------------------------------------------


async def _ended_within(connection: Connection, seconds: float) -> tuple[grpc.StatusCode, str, str]:
    """How the Dial ended; TimeoutError if it was still open after ``seconds``."""
    async with asyncio.timeout(seconds):
        with contextlib.suppress(PeerGone):  # the status, which refusal() reads
            while await connection.stream.receive():
                pass
        return await connection.refusal()


def test_users_remove_ends_the_users_open_connection_at_once(relay):
    chain = relay.chain
    relay.users["gina"] = chain.state_dir / "gina"
    login_with_code(chain, "gina", [NS], relay.users["gina"])
    gina, alice = fresh_token(relay, "gina"), fresh_token(relay, "alice")

    async def main() -> None:
        async with relay_channel(relay) as stub:
            hers, others = dial(stub, gina), dial(stub, alice)
            assert await hers.opened() and await others.opened()
            assert await hers.get(gina, pod_path("before-" + secrets.token_hex(2))) == 404
            await asyncio.to_thread(chain.cli, "users", "remove", "gina")
            code, message, reason = await _ended_within(hers, 1.0)
            assert code == grpc.StatusCode.PERMISSION_DENIED and reason == "access-revoked", (code, message)
            assert message == "connection to cluster dev ended: user gina was removed from the relay", message
            with pytest.raises(PeerGone):
                await hers.get(gina, pod_path("after-" + secrets.token_hex(2)))
            # another user's connection is not touched
            assert await others.get(alice, pod_path("other-" + secrets.token_hex(2))) == 404
            others.call.cancel()

    asyncio.run(main())


def test_clusters_revoke_ends_connections_the_list_no_longer_admits(relay):
    chain = relay.chain
    dave, alice = fresh_token(relay, "dave"), fresh_token(relay, "alice")

    async def main() -> None:
        async with relay_channel(relay) as stub:
            his, others = dial(stub, dave), dial(stub, alice)
            assert await his.opened() and await others.opened()
            assert await his.get(dave, pod_path("before-" + secrets.token_hex(2))) == 403  # no RBAC, but through
            await asyncio.to_thread(chain.cli, "clusters", "revoke", chain.cluster, "--user", "dave")
            code, message, reason = await _ended_within(his, 1.0)
            assert code == grpc.StatusCode.PERMISSION_DENIED and reason == "access-revoked", (code, message)
            assert "access to cluster dev was revoked" in message, message
            assert await others.get(alice, pod_path("other-" + secrets.token_hex(2))) == 404
            others.call.cancel()
            # a new Dial of dave's is refused too
            again = dial(stub, dave)
            assert not await again.opened()
            assert (await again.refusal())[0] == grpc.StatusCode.PERMISSION_DENIED

    try:
        asyncio.run(main())
    finally:
        chain.cli("clusters", "grant", chain.cluster, "--user", "dave")


def test_a_connection_ends_when_the_token_it_was_opened_with_expires(relay):
    alice = fresh_token(relay, "alice")
    expires = tokens_exp(alice)

    async def main() -> None:
        async with relay_channel(relay) as stub:
            connection = dial(stub, alice)
            assert await connection.opened()
            assert await connection.get(alice, pod_path("live-" + secrets.token_hex(2))) == 404
            code, message, reason = await _ended_within(connection, LIFETIME + 4)
            ended = time.time()
            assert code == grpc.StatusCode.PERMISSION_DENIED and reason == "access-revoked", (code, message)
            assert "expired" in message, message
            # at the token's expiry plus the relay's 1 s clock-skew leeway, not before
            assert expires + 1 - 0.2 <= ended <= expires + 1 + 2, (expires, ended)

    asyncio.run(main())


def tokens_exp(token: str) -> float:
    return float(jwt.decode(token, options={"verify_signature": False})["exp"])


# ---- point 4: no enumeration before authentication ------------------------------------------------


def _answer(relay, token: str | None, cluster: str) -> tuple[grpc.StatusCode, str, str]:
    async def main() -> tuple[grpc.StatusCode, str, str]:
        async with relay_channel(relay) as stub:
            metadata = [(md.CLUSTER, cluster)] + ([bearer(token)] if token else [])
            connection = Connection(stub.Dial(metadata=tuple(metadata)))
            assert not await connection.opened()
            code, message, reason = await connection.refusal()
            return code, message.replace(cluster, "CLUSTER"), reason

    return asyncio.run(main())


def test_an_unknown_cluster_and_one_that_does_not_admit_the_caller_answer_alike(relay):
    bob = fresh_token(relay, "bob")  # verified, not on dev's list
    serviceaccount = relay.devcluster.token(NS, "default")  # an issuer the relay does not know
    for token in (bob, serviceaccount, "not-a-jwt"):
        listed = _answer(relay, token, "dev")
        unknown = _answer(relay, token, "no-such-cluster")
        assert listed == unknown, (listed, unknown)
        assert listed[0] == grpc.StatusCode.PERMISSION_DENIED and listed[2] == "access-denied", listed
    assert _answer(relay, None, "dev") == _answer(relay, None, "no-such-cluster")
    forged = bob[:-4] + ("AAAA" if not bob.endswith("AAAA") else "BBBB")
    listed, unknown = _answer(relay, forged, "dev"), _answer(relay, forged, "no-such-cluster")
    assert listed == unknown and listed[0] == grpc.StatusCode.UNAUTHENTICATED, listed


def test_only_a_verified_admitted_caller_learns_when_the_agent_was_last_seen(relay):
    code, message, reason = _answer(relay, relay.devcluster.token(NS, "default"), "idle")
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "agent-not-connected")
    assert message == "cluster CLUSTER is not connected", message
    code, message, _ = _answer(relay, fresh_token(relay, "alice"), "idle")
    assert code == grpc.StatusCode.UNAVAILABLE and message == "cluster CLUSTER is not connected (agent never connected)"


# ---- point 6: connection limits at the relay -------------------------------------------------------


def test_connections_over_the_per_identity_and_per_cluster_limits_are_refused(relay, tmp_path):
    # erin's client proxy and kubectl, to see what a user sees over the limit
    kubeconfig = tmp_path / "kubeconfig"
    proxy, _ = relay.chain.start_proxy(None, kubeconfig, name="proxy-erin", state_dir=relay.users["erin"])
    try:
        _over_the_limits(relay, kubeconfig)
    finally:
        proxy.stop()


def _over_the_limits(relay, kubeconfig: Path) -> None:
    _no_connection_open(relay)
    erin, frank, alice = fresh_token(relay, "erin"), fresh_token(relay, "frank"), fresh_token(relay, "alice")

    async def main() -> None:
        async with relay_channel(relay) as stub:
            held = [dial(stub, erin) for _ in range(MAX_PER_IDENTITY)]
            assert all([await c.opened() for c in held])
            over = dial(stub, erin)
            assert not await over.opened()
            code, message, reason = await over.refusal()
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason == "too-many-connections"
            assert message == (f'user "erin" has {MAX_PER_IDENTITY} open connections at the relay, its limit '
                               "(--max-connections-per-identity)"), message
            shown = await asyncio.to_thread(relay.devcluster.kubectl, "get", "--raw", "/version",
                                            user_kubeconfig=kubeconfig, check=False, timeout=30)
            assert shown.returncode != 0 and "TooManyRequests" in shown.stderr, shown.stderr
            assert "--max-connections-per-identity" in shown.stderr, shown.stderr
            more = [dial(stub, frank) for _ in range(MAX_PER_CLUSTER - MAX_PER_IDENTITY)]
            assert all([await c.opened() for c in more])
            over = dial(stub, alice)
            assert not await over.opened()
            code, message, reason = await over.refusal()
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-connections-per-cluster" in message
            # one ends: the next Dial is served again
            held[0].call.cancel()
            await asyncio.to_thread(_no_connection_open_but, relay, MAX_PER_CLUSTER - 1)
            again = dial(stub, erin)
            assert await again.opened()
            assert await again.get(erin, pod_path("again-" + secrets.token_hex(2))) == 404
            for connection in [*held, *more, again]:
                connection.call.cancel()

    asyncio.run(main())


def _no_connection_open_but(relay, count: int) -> None:
    relay_process = relay.chain.processes["relay"]
    wait_until(lambda: relay_process.stats()["open_connections"] == count, 10, "a connection to end",
               relay_process, 0.1)


# ---- point 1 at the auth proxy: the rule per request (unit) ----------------------------------------


def test_the_auth_proxy_holds_each_connection_to_one_identity() -> None:
    issuer = FakeIssuer()
    auth = oidc_authenticator(issuer)  # maps sub -> "oidc:<sub>": the binding compares the raw sub
    alice, bob = issuer.token().encode(), issuer.token(sub="bob").encode()
    serviceaccount = jwt.encode({"iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:a:b"},
                                "k" * 32).encode()

    def decide(held, token: bytes) -> Forward | Reject:
        return asyncio.run(held.authenticate([(b"authorization", b"Bearer " + token)]))

    forbidden = Reject(403, FORBIDDEN)
    # opened by alice as the relay verified her: only alice, not bob, not a ServiceAccount
    held = auth.bound_to((ISSUER, "alice", ""))
    assert isinstance(decide(held, alice), Forward)
    assert decide(held, bob) == forbidden and decide(held, serviceaccount) == forbidden
    assert isinstance(decide(held, alice), Forward)
    # an alice of another issuer is someone else
    assert decide(auth.bound_to(("https://elsewhere.example", "alice", "")), alice) == forbidden
    # a name removed and added again is a new user (the relay's tokens carry its id in `uid`): a token
    # of the old one is someone else on the new one's connection, and the other way round
    old, new = issuer.token(uid="id-old").encode(), issuer.token(uid="id-new").encode()
    held = auth.bound_to((ISSUER, "alice", "id-new"))
    assert isinstance(decide(held, new), Forward)
    assert decide(held, old) == forbidden and decide(held, alice) == forbidden
    # not verified at the relay: a ServiceAccount token passes (the apiserver authenticates it), the first
    # identity verified here binds the connection
    held = auth.bound_to(None)
    assert isinstance(decide(held, serviceaccount), Forward)
    assert isinstance(decide(held, bob), Forward)
    assert decide(held, alice) == forbidden and decide(held, serviceaccount) == forbidden
    assert isinstance(decide(held, bob), Forward)
    # token passthrough mode cannot verify a token, so it holds nothing: the apiserver authenticates
    passthrough = TokenPassthrough()
    assert passthrough.bound_to((ISSUER, "alice", "")) is passthrough


# ---- point 2 at the relay: which open connections a change ends (unit) -----------------------------


def test_an_access_change_ends_exactly_the_connections_it_no_longer_admits(tmp_path) -> None:
    clusters, _, issuer, verifier, users, access = relay_parts(tmp_path)
    asyncio.run(clusters.add("dev"))
    alice_record, _, _ = asyncio.run(users.add("alice", ["dev"]))
    bob_record, _, _ = asyncio.run(users.add("bob", ["ops"]))
    authorizer = DialAuthorizer(access, verifier, users, issuer.url)
    registry = ConnectionRegistry()
    # The recheck follows the store: no call here, the changes below end what they no longer admit.
    RevocationWatch(access.store, clusters, authorizer, registry)

    async def main() -> None:
        alice = await verifier.verify((await issuer.mint("alice", ("dev",), alice_record.uid))[0])
        bob = await verifier.verify((await issuer.mint("bob", ("ops",), bob_record.uid))[0])
        unverified = registry.open("dev", None, None)  # a ServiceAccount token on a passthrough cluster
        hers = registry.open("dev", alice, None)
        his = registry.open("dev", bob, None)
        await access.grant("dev", Entry("group", "dev"))  # the passthrough cluster becomes access-listed
        revoked = "access to cluster dev was revoked at the relay"
        assert (await asyncio.wait_for(unverified.wait_revoked(), 1)) == revoked
        assert (await asyncio.wait_for(his.wait_revoked(), 1)).startswith("access to cluster dev was revoked")
        assert not hers.reason  # still admitted
        await users.remove("alice")
        assert (await asyncio.wait_for(hers.wait_revoked(), 1)) == "user alice was removed from the relay"
        for connection in (unverified, hers, his):
            registry.close(connection)
        assert len(registry) == 0

    asyncio.run(main())
