"""A small asyncio client for etcd v3: KV, Txn, Lease, Watch — what the relay's store needs, no more.

No maintained asyncio client fits: aetcd 1.0.0 (the one that imports with our protobuf) opens only
insecure channels, and the relay talks to etcd with TLS and a client certificate. This one uses the
stubs generated from etcd's own .proto files (``api/``, by scripts/etcd_protos.py).

Endpoints: one channel per member. Unary calls go to the current member; when it is unreachable
(UNAVAILABLE, or no answer within the call's deadline) the next one is tried, until every member
has failed once. Watches and lease keep-alives are streams: when one breaks, its owner opens it
again (on the next member), which :class:`~clusterconnect.relay.storage.etcd.cache.PrefixCache`
and :func:`~clusterconnect.relay.storage.etcd.lease_keeper.keep_alive` do
(from a thread of its own: see there).

Every stream carries ``hasleader=true`` (etcd's clientv3.WithRequireLeader): a member cut off from
the quorum ends such streams at once instead of serving a watch that will never see a change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

import grpc

from clusterconnect.errors import InvalidInput, Unavailable
from clusterconnect.logs import get_logger
from clusterconnect.relay.storage.etcd.api import kv_pb2, rpc_pb2, rpc_pb2_grpc

log = get_logger(__name__)

# A unary call gives up on a member after this long and tries the next one. etcd answers a
# linearizable read or a write in milliseconds when it has a leader; a member that lost its
# leader makes the caller wait for its election timeout (1 s by default) before failing.
CALL_TIMEOUT = 3.0
_RETRY_ON = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
REQUIRE_LEADER = (("hasleader", "true"),)
# Dead members are found by gRPC keepalive on idle channels too (a watch may be quiet for hours).
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]

T = TypeVar("T")


class EtcdUnavailable(Unavailable):
    """No member of the etcd cluster answered (the message names the last error)."""


class Compacted(EtcdUnavailable):
    """A watch asked for a revision that etcd has compacted away: list again, then watch from there."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (etcd keeps history from {compact_revision})")
        self.compact_revision = compact_revision


class LeaseLost(EtcdUnavailable):
    """The lease expired or could not be renewed before its TTL ran out."""


@dataclass(frozen=True)
class EtcdTLS:
    """PEM bytes: the CA that signed the members' certificates, and our client certificate and key."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


@dataclass(frozen=True)
class Event:
    """One change seen by a watch: a put (value set) or a delete (value None)."""

    key: bytes
    value: bytes | None
    mod_revision: int


@dataclass(frozen=True)
class WatchBatch:
    """What one WatchResponse carried: events (possibly none: a progress notification) and the revision
    up to which the watcher has seen everything."""

    events: tuple[Event, ...]
    revision: int


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes a range cover every key starting with ``prefix`` (etcd's rule)."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"  # every byte 0xff: the range runs to the end of the keyspace


def parse_endpoints(value: str) -> list[str]:
    """``https://h1:2379,https://h2:2379`` -> ["h1:2379", "h2:2379"] (http:// only for tests without TLS)."""
    endpoints = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        parsed = urlparse(item if "://" in item else "https://" + item)
        if parsed.scheme not in ("https", "http") or not parsed.hostname or not parsed.port:
            raise InvalidInput(f"not an etcd endpoint (https://HOST:PORT): {item!r}")
        host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
        endpoints.append(f"{host}:{parsed.port}")
    if not endpoints:
        raise InvalidInput("--etcd-endpoints names no endpoint")
    return endpoints


def _kv(message: kv_pb2.KeyValue) -> KeyValue:
    return KeyValue(message.key, message.value, message.mod_revision, message.create_revision, message.lease)


def open_channel(module: Any, target: str, tls: EtcdTLS | None) -> Any:
    """A channel to one member from ``module`` (``grpc.aio`` on the event loop, ``grpc`` for the lease
    keeper's thread), with the same credentials and options either way."""
    if tls is None:
        return module.insecure_channel(target, options=CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
    return module.secure_channel(target, credentials, options=CHANNEL_OPTIONS)


class _Member:
    def __init__(self, target: str, tls: EtcdTLS | None) -> None:
        self.target = target
        self.channel = open_channel(grpc.aio, target, tls)
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)
        self.watch = rpc_pb2_grpc.WatchStub(self.channel)


class Etcd:
    """A client for one etcd cluster. Close it with :meth:`close` (or use it as an async context manager)."""

    def __init__(self, endpoints: Sequence[str], tls: EtcdTLS | None, call_timeout: float = CALL_TIMEOUT) -> None:
        if not endpoints:
            raise InvalidInput("no etcd endpoint")
        self.targets, self.tls = list(endpoints), tls
        self._members = [_Member(target, tls) for target in endpoints]
        self._current = 0
        self.call_timeout = call_timeout

    async def __aenter__(self) -> Etcd:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        for member in self._members:
            await member.channel.close()

    # -- calls on whichever member answers ----------------------------------------------------------

    def member(self) -> _Member:
        return self._members[self._current]

    def next_member(self, failed: _Member) -> _Member:
        """Move on from a member that failed (unless someone already did)."""
        if self._members[self._current] is failed:
            self._current = (self._current + 1) % len(self._members)
        return self._members[self._current]

    async def _call(self, call: Callable[[_Member], Any]) -> Any:
        last: grpc.aio.AioRpcError | None = None
        member = self.member()
        for _ in self._members:
            try:
                return await call(member)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RETRY_ON:
                    raise EtcdUnavailable(f"etcd {member.target}: {exc.code().name}: {exc.details()}") from None
                last = exc
                member = self.next_member(member)
        assert last is not None
        raise EtcdUnavailable(f"no etcd member answered; last: {last.code().name}: {last.details()}")

    # -- KV ---------------------------------------------------------------------------------------

    async def get(self, key: bytes) -> KeyValue | None:
        response = await self._call(lambda m: m.kv.Range(rpc_pb2.RangeRequest(key=key), timeout=self.call_timeout))
        return _kv(response.kvs[0]) if response.kvs else None

    async def get_prefix(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` and the revision the list is consistent at."""
        request = rpc_pb2.RangeRequest(key=prefix, range_end=prefix_end(prefix))
        response = await self._call(lambda m: m.kv.Range(request, timeout=self.call_timeout))
        return [_kv(kv) for kv in response.kvs], response.header.revision

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        request = rpc_pb2.PutRequest(key=key, value=value, lease=lease)
        response = await self._call(lambda m: m.kv.Put(request, timeout=self.call_timeout))
        return int(response.header.revision)

    async def delete(self, key: bytes, *, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it); the number of keys deleted."""
        request = rpc_pb2.DeleteRangeRequest(key=key, range_end=prefix_end(key) if prefix else b"")
        response = await self._call(lambda m: m.kv.DeleteRange(request, timeout=self.call_timeout))
        return int(response.deleted)

    async def txn(self, compare: Sequence[rpc_pb2.Compare], success: Sequence[rpc_pb2.RequestOp],
                  failure: Sequence[rpc_pb2.RequestOp] = ()) -> rpc_pb2.TxnResponse:
        request = rpc_pb2.TxnRequest(compare=compare, success=success, failure=failure)
        response: rpc_pb2.TxnResponse = await self._call(lambda m: m.kv.Txn(request, timeout=self.call_timeout))
        return response

    async def create(self, key: bytes, value: bytes, lease: int = 0) -> bool:
        """Put ``key`` only if it does not exist (create-if-absent); False if it already did."""
        response = await self.txn([absent(key)], [put_op(key, value, lease)])
        return bool(response.succeeded)

    # -- leases -----------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        request = rpc_pb2.LeaseGrantRequest(TTL=ttl)
        response = await self._call(lambda m: m.lease.LeaseGrant(request, timeout=self.call_timeout))
        if response.error:
            raise EtcdUnavailable(f"etcd refused a lease: {response.error}")
        return int(response.ID)

    async def revoke(self, lease: int) -> None:
        request = rpc_pb2.LeaseRevokeRequest(ID=lease)
        await self._call(lambda m: m.lease.LeaseRevoke(request, timeout=self.call_timeout))

    # -- watches ----------------------------------------------------------------------------------

    async def watch_prefix(self, prefix: bytes, start_revision: int) -> AsyncIterator[WatchBatch]:
        """Changes under ``prefix`` from ``start_revision`` on, batch by batch, until the stream breaks
        (EtcdUnavailable: open a new watch from the last revision seen) or history was compacted
        (Compacted: list again). Progress notifications arrive as batches without events."""
        member = self.member()
        call = member.watch.Watch(metadata=REQUIRE_LEADER)
        create = rpc_pb2.WatchCreateRequest(key=prefix, range_end=prefix_end(prefix), start_revision=start_revision,
                                            progress_notify=True)
        try:
            await call.write(rpc_pb2.WatchRequest(create_request=create))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise EtcdUnavailable(f"etcd {member.target} ended the watch")
                if response.compact_revision:
                    raise Compacted(response.compact_revision)
                if response.canceled:
                    raise EtcdUnavailable(f"etcd {member.target} cancelled the watch: {response.cancel_reason}")
                events = tuple(
                    Event(e.kv.key, None if e.type == kv_pb2.Event.DELETE else e.kv.value, e.kv.mod_revision)
                    for e in response.events
                )
                yield WatchBatch(events, response.header.revision)
        except grpc.aio.AioRpcError as exc:
            self.next_member(member)
            raise EtcdUnavailable(f"etcd {member.target}: watch broke: {_reason(exc)}") from None
        finally:
            call.cancel()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return type(exc).__name__


# -- building Txn operations ------------------------------------------------------------------------

def absent(key: bytes) -> rpc_pb2.Compare:
    """Compare: ``key`` does not exist (its create revision is 0)."""
    return rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0)


def unchanged_since(key: bytes, mod_revision: int) -> rpc_pb2.Compare:
    """Compare: ``key`` was last written at ``mod_revision`` (optimistic concurrency)."""
    return rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL,
                           mod_revision=mod_revision)


def put_op(key: bytes, value: bytes, lease: int = 0) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=lease))


def delete_op(key: bytes, *, prefix: bool = False) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(
        key=key, range_end=prefix_end(key) if prefix else b""))
