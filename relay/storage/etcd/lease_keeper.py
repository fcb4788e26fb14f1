"""An etcd lease kept alive from a thread of its own, on channels of its own, off the event loop.

Why a thread: the relay's event loop also serves every agent's hello and every Dial. In the
10,000-agent connect storm on 2 cores (bench/replicas.py, 2026-12-03 07:51 UTC) a keep-alive task on
that loop went more than 6.7 s between two turns (no renewal timed out; etcd answered the late one
with TTL 0), and all three replicas lost their leases and drained themselves, their agents storming
the next. A thread gets the interpreter every 5 ms (``sys.getswitchinterval()``) however busy the
loop is, and its blocking gRPC calls wait outside it.

Still fail closed: a replica whose loop is hung must not keep routes it cannot serve. The loop ticks
a timestamp every second; the thread renews only while that tick is younger than ``stall_limit``
(2 × TTL: well above the stalls a storm causes, so a hung loop loses the lease within 3 × TTL).
SIGSTOP stops the thread with the process, so a stopped replica loses its lease as before.

Each renewal is one short LeaseKeepAlive stream (one request, one answer, deadline TTL/3): etcd answers
a request before it reads the half-close, and a stream per 3 s costs nothing next to a watch.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc

from clusterconnect.logs import get_logger
from clusterconnect.relay.storage.etcd.api import rpc_pb2, rpc_pb2_grpc
from clusterconnect.relay.storage.etcd.client import REQUIRE_LEADER, Etcd, EtcdTLS, LeaseLost, open_channel

log = get_logger(__name__)

# How often the event loop proves it is alive to the keeper thread.
LOOP_TICK = 1.0


class LeaseKeeper:
    """Renews one lease every TTL/3 from :meth:`run` (a thread's body) until :attr:`stop` is set or the
    lease is lost; :attr:`loop_seen` is the event loop's latest tick (``time.monotonic()``)."""

    def __init__(self, targets: list[str], tls: EtcdTLS | None, lease: int, ttl: int) -> None:
        self.targets, self.tls, self.lease, self.ttl = targets, tls, lease, ttl
        self.interval = max(ttl / 3, 0.2)
        self.stall_limit = 2.0 * ttl
        self.stop = threading.Event()
        self.loop_seen = time.monotonic()

    def _renew(self, stub: rpc_pb2_grpc.LeaseStub) -> int:
        """One renewal; the lease's remaining TTL as etcd tells it (0: expired)."""
        answers = stub.LeaseKeepAlive(iter([rpc_pb2.LeaseKeepAliveRequest(ID=self.lease)]),
                                      timeout=self.interval, metadata=REQUIRE_LEADER)
        try:
            for answer in answers:
                return int(answer.TTL)
        finally:
            answers.cancel()
        raise EOFError("the keep-alive stream ended without an answer")

    def run(self) -> LeaseLost | None:
        """Until stopped (None) or the lease is lost (returned)."""
        channels: list[grpc.Channel] = [open_channel(grpc, target, self.tls) for target in self.targets]
        stubs = [rpc_pb2_grpc.LeaseStub(channel) for channel in channels]
        member = 0
        renewed = time.monotonic()
        try:
            while not self.stop.is_set():
                stalled = time.monotonic() - self.loop_seen
                if stalled > self.stall_limit:
                    return LeaseLost(f"event loop unresponsive for {stalled:.0f}s: lease {self.lease:x} left to expire")
                try:
                    if self._renew(stubs[member]) <= 0:
                        return LeaseLost(f"lease {self.lease:x} expired")
                    renewed = time.monotonic()
                    wait = self.interval
                except (grpc.RpcError, EOFError) as exc:
                    reason = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.Call) else str(exc)
                    log.warning("etcd lease keep-alive failed; trying the next member",
                                member=self.targets[member], reason=reason)
                    member = (member + 1) % len(stubs)
                    wait = min(self.interval, 0.5)
                if time.monotonic() - renewed >= self.ttl:
                    return LeaseLost(f"lease {self.lease:x} not renewed for {self.ttl}s")
                self.stop.wait(wait)
            return None
        finally:
            for channel in channels:
                channel.close()


async def _tick(keeper: LeaseKeeper) -> None:
    while True:
        keeper.loop_seen = time.monotonic()
        await asyncio.sleep(LOOP_TICK)


async def keep_alive(etcd: Etcd, lease: int, ttl: int) -> None:
    """Keep ``lease`` alive until cancelled, renewing every ttl/3 s on another member if one fails;
    raises :class:`LeaseLost` when it expired, went ``ttl`` s without a renewal, or this loop stalled."""
    keeper = LeaseKeeper(etcd.targets, etcd.tls, lease, ttl)
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[LeaseLost | None] = loop.create_future()

    def settle(result: LeaseLost | None) -> None:
        if not outcome.done():
            outcome.set_result(result)

    def body() -> None:
        result = keeper.run()
        try:
            loop.call_soon_threadsafe(settle, result)
        except RuntimeError:  # the loop closed first: nobody is waiting
            pass

    # A daemon: the keeper stops within TTL/3 of `stop`, and never holds the process's exit.
    threading.Thread(target=body, name=f"etcd-lease-{lease:x}", daemon=True).start()
    try:
        async with asyncio.TaskGroup() as group:
            ticker = group.create_task(_tick(keeper))
            lost = await outcome
            ticker.cancel()
    finally:
        keeper.stop.set()
    raise lost or LeaseLost(f"lease {lease:x}: keeper stopped")
