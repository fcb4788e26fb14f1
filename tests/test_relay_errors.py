"""How the relay's refusals reach kubectl, and the relay's domain errors in the one hierarchy."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from clusterconnect import errors
from clusterconnect import metadata as md
from clusterconnect.dial_refusals import describe_rpc_error, dial_refusal, error_response
from clusterconnect.metadata import DialRefusal
from clusterconnect.relay.agent_identity.pki import CsrInvalid, CsrRefused
from clusterconnect.relay.storage.clusters import AlreadyExists, ClusterStore, InvalidName
from clusterconnect.relay.storage.kv import SqliteKV
from clusterconnect.relay.storage.store import Store
from clusterconnect.relay.user_identity.access import AccessStore, ClusterNotRegistered, Entry, InvalidEntry
from clusterconnect.relay.user_identity.users import (
    InvalidUserInput,
    LoginCodeInvalid,
    NoSuchUser,
    UserError,
    UserExists,
    UserStore,
)


def _status(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def test_the_relays_message_is_shown_as_it_is_when_it_gives_a_reason() -> None:
    # "not connected" contains "connect", which the transport-failure check below looks for.
    message = "cluster prod is not connected (agent last seen 3m ago)"
    reason = dial_refusal(((md.REASON, "agent-not-connected"),))
    assert reason is DialRefusal.AGENT_NOT_CONNECTED
    assert describe_rpc_error(grpc.StatusCode.UNAVAILABLE, message, "https://r:1", reason) == message
    code, body = _status(error_response(grpc.StatusCode.UNAVAILABLE, message, reason=reason))
    assert (code, body["reason"], body["message"]) == (502, "ServiceUnavailable", message)


def test_without_a_reason_the_failure_is_reaching_the_relay() -> None:
    assert dial_refusal(()) is None and dial_refusal(None) is None
    assert describe_rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", "https://r:1") == (
        "cannot reach relay https://r:1: failed to connect to all addresses")


def test_an_unknown_reason_falls_back_to_the_status_code() -> None:
    assert dial_refusal(((md.REASON, "something-newer"),)) is None
    assert dial_refusal(((md.REASON, b"access-denied"),)) is DialRefusal.ACCESS_DENIED


@pytest.mark.parametrize(("reason", "http", "k8s"), [
    (DialRefusal.MISSING_CLUSTER, 400, "BadRequest"),
    (DialRefusal.MISSING_TOKEN, 401, "Unauthorized"),
    (DialRefusal.CLUSTER_NOT_REGISTERED, 404, "NotFound"),
    (DialRefusal.TOKEN_REFUSED, 401, "Unauthorized"),
    (DialRefusal.ACCESS_DENIED, 403, "Forbidden"),
    (DialRefusal.AGENT_NOT_CONNECTED, 502, "ServiceUnavailable"),
    (DialRefusal.AGENT_OVERLOADED, 502, "ServiceUnavailable"),
    (DialRefusal.AGENT_NOT_ANSWERING, 502, "ServiceUnavailable"),
    (DialRefusal.CONNECTION_LOST, 502, "ServiceUnavailable"),
    (DialRefusal.TOO_MANY_CONNECTIONS, 429, "TooManyRequests"),
    (DialRefusal.ACCESS_REVOKED, 403, "Forbidden"),
])
def test_each_reason_has_its_kubernetes_status(reason: DialRefusal, http: int, k8s: str) -> None:
    # The gRPC code given is deliberately unrelated: the reason decides.
    code, body = _status(error_response(grpc.StatusCode.INTERNAL, "x", reason=reason))
    assert (code, body["code"], body["reason"]) == (http, http, k8s)


def test_relay_domain_errors_carry_their_status(tmp_path) -> None:
    store = asyncio.run(Store.open(SqliteKV(tmp_path / "relay.db")))
    clusters = asyncio.run(ClusterStore.open(store))
    users = UserStore(store)
    access = AccessStore(store, clusters)
    asyncio.run(clusters.add("prod"))
    asyncio.run(users.add("alice", []))
    cases = [
        (lambda: asyncio.run(clusters.add("Not_Valid")), InvalidName, grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: asyncio.run(clusters.add("prod")), AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
        (lambda: asyncio.run(users.add("system-x", [])), InvalidUserInput, grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: asyncio.run(users.add("alice", [])), UserExists, grpc.StatusCode.ALREADY_EXISTS),
        (lambda: asyncio.run(users.new_code("bob")), NoSuchUser, grpc.StatusCode.NOT_FOUND),
        (lambda: asyncio.run(users.redeem_code("nope", "laptop")), LoginCodeInvalid,
         grpc.StatusCode.UNAUTHENTICATED),
        (lambda: asyncio.run(access.grant("nope", Entry("user", "alice"))), ClusterNotRegistered,
         grpc.StatusCode.NOT_FOUND),
        (lambda: asyncio.run(access.grant("prod", Entry("robot", "x"))), InvalidEntry,
         grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for call, cls, status in cases:
        with pytest.raises(cls) as raised:
            call()
        assert isinstance(raised.value, errors.ClusterConnectError) and not isinstance(raised.value, ValueError)
        assert raised.value.grpc_status == status, cls
    assert issubclass(UserExists, UserError) and issubclass(NoSuchUser, UserError)
    assert CsrRefused("x").grpc_status == grpc.StatusCode.PERMISSION_DENIED
    assert CsrInvalid("x").grpc_status == grpc.StatusCode.INVALID_ARGUMENT
