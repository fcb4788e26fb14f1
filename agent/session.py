"""The agent's outbound session: control stream to the relay, one Accept stream per dialled connection."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from clusterconnect import __version__
from clusterconnect import metadata as md
from clusterconnect.agent.backoff import Backoff
from clusterconnect.agent.enrollment import Enrolled
from clusterconnect.agent.raw_calls import AuthProxyCalls, RawChunkStream, RelayCalls
from clusterconnect.agent.warm_pairs import WarmPairs
from clusterconnect.errors import PermissionDenied, Unavailable
from clusterconnect.grpc_options import AGENT_CHANNEL_OPTIONS
from clusterconnect.logs import get_logger
from clusterconnect.streams import RPC_ENDED, PeerGone, splice
from clusterconnect.tasks import cancelling, race, unwrap
from clusterconnect.tracing import connection_span
from clusterconnect.v1 import tunnel_pb2

log = get_logger(__name__)

# The generated stubs are unannotated (protos/): their calls are grpc.aio streams of any message.
Call = grpc.aio.StreamStreamCall[Any, Any]

# A session that stayed up this long counts as healthy: the next failure starts backoff afresh.
HEALTHY_AFTER = 10.0


class _SessionOver(Unavailable):
    """The control stream ended, taking the session's connections with it."""


class AgentRefused(PermissionDenied):
    """The relay refused this agent's identity (cluster removed, certificate replaced or for another
    cluster): trying again cannot help, so the agent exits with this line instead of retrying for ever."""


def _bound_chunk(traceparent: str, source: tunnel_pb2.Bound | tunnel_pb2.DialRequest) -> bytes:
    """The first message of a Serve stream (serialized: the call is raw): our span's traceparent and the
    connection's caller as the relay verified it. A relay that sent no caller gets none passed on, and
    the auth proxy refuses the connection: the agent never makes up an identity."""
    bound = tunnel_pb2.Bound(traceparent=traceparent)
    if source.HasField("caller"):
        bound.caller.CopyFrom(source.caller)
    return tunnel_pb2.Chunk(bound=bound).SerializeToString()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@dataclass
class AgentConfig:
    cluster: str
    # The agent's certificate and the relay's CA; the tunnel goes to enrolled.agent_target (mutual TLS).
    enrolled: Enrolled
    authproxy: AuthProxyCalls
    # Touched while the control stream is healthy, for an exec readiness probe in Kubernetes.
    health_file: Path | None = None
    # Accept (relay) + Serve (auth proxy) pairs kept open ahead of need, so a Dial needs no round trip to us.
    warm_streams: int = 2


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.open_connections = 0
        # For the metrics (agent/metrics.py): sessions welcomed, connections carried by how they were
        # opened, warm pairs waiting for a Dial.
        self.sessions_started = 0
        self.carried = {"warm": 0, "requested": 0}
        self.warm_waiting = 0
        self.connected = asyncio.Event()
        self._health_failing = False
        # Set (and replaced) each time a session is welcomed: a draining session leaves on the next one's.
        self._welcomed = asyncio.Event()
        # Why the current session handed over to the next one (for the log).
        self._handover_reason = ""
        # Which of --relay's relays the next session goes to (each session takes the next).
        self._next_relay = 0

    def _metadata(self, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        # No credential: the relay knows the agent by its client certificate.
        return ((md.CLUSTER, self.config.cluster), *extra)

    async def run_forever(self) -> None:
        """Sessions one after another until cancelled; the TaskGroup owns the certificate renewals
        and every session (the current one and those draining after a handover)."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.config.enrolled.renew_forever())
            await self._sessions(tasks)

    async def _sessions(self, tasks: asyncio.TaskGroup) -> None:
        """One session after another. A session whose certificate was renewed hands over: the next one
        starts at once with the new certificate while the old one finishes its connections (in
        ``tasks``). Whatever ends a session, it is logged and the next one follows after a backoff;
        only cancellation ends the loop."""
        backoff = Backoff()
        while True:
            started = time.monotonic()
            # Set when the next session is due: this one's certificate was renewed, or it ended.
            next_due = asyncio.Event()
            session = tasks.create_task(self._session_to_end(next_due))
            await next_due.wait()
            if not session.done():
                log.info("handing over to a new session; connections on the old one go on",
                         reason=self._handover_reason)
                backoff.reset()
                continue
            reason = session.result()  # AgentRefused: the agent's end (run_forever's TaskGroup ends with it)
            if reason is None:  # handed over and already finished: the next one is due at once
                backoff.reset()
                continue
            self.connected.clear()
            if time.monotonic() - started > HEALTHY_AFTER:
                backoff.reset()
            delay = backoff.next_delay()
            log.warning("relay session ended; reconnecting", reason=reason, retry_in=round(delay, 2))
            await asyncio.sleep(delay)

    async def _session_to_end(self, next_due: asyncio.Event) -> str | None:
        """Run one session; the reason it ended as one line, or None if it ended after handing over.

        Raises only CancelledError and AgentRefused: any other failure of a session (the relay's
        status, a usage error of a call the relay ended, the health file's directory gone) is a reason
        to reconnect, and this task lives in the agent's TaskGroup, which one failed session must not
        tear down. PERMISSION_DENIED for the current session is the relay's final word on this
        agent's certificate (relay/datapath/tunnel.py: cluster removed; the authenticator: replaced,
        expired or another cluster's): reconnecting would be refused the same way for ever."""
        try:
            await self._session(next_due)
            return None if next_due.is_set() else "relay ended the session"
        except Exception as exc:
            reason = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else _describe(exc)
            if next_due.is_set():  # a draining session: the next one runs already
                log.debug("old session ended", reason=reason)
                return None
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() is grpc.StatusCode.PERMISSION_DENIED:
                raise AgentRefused(f"the relay refused this agent: {exc.details()}") from None
            return reason
        finally:
            next_due.set()

    async def _kubernetes_version(self) -> str:
        try:
            info = await self.config.authproxy.Info(tunnel_pb2.InfoRequest(), timeout=3)
            return str(info.kubernetes_version)
        except grpc.aio.AioRpcError as exc:
            log.warning("auth proxy not reachable", reason=f"{exc.code().name}: {exc.details()}")
            return ""

    async def _session(self, handover: asyncio.Event) -> None:
        enrolled = self.config.enrolled
        rotated = enrolled.rotated  # taken before the certificate, so no renewal goes unnoticed
        # A channel of its own (no shared subchannel): a session must really use its certificate.
        options = [*AGENT_CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        self._next_relay += 1
        target = await enrolled.use_relay(self._next_relay - 1)
        async with grpc.aio.secure_channel(target, enrolled.channel_credentials(), options=options) as channel:
            stub = RelayCalls(channel)
            hello = tunnel_pb2.AgentHello(
                cluster=self.config.cluster,
                agent_version=__version__,
                kubernetes_version=await self._kubernetes_version(),
            )
            call = stub.Connect(metadata=self._metadata())
            try:
                await call.write(tunnel_pb2.AgentMessage(hello=hello))
                first = await call.read()
                if first is grpc.aio.EOF or first.WhichOneof("message") != "welcome":
                    raise PeerGone("relay did not welcome the agent")
                log.info("connected to relay", relay=target, cluster=self.config.cluster,
                         certificate_serial=format(enrolled.identity.serial, "x"))
                self.connected.set()
                self.sessions_started += 1
                previous, self._welcomed = self._welcomed, asyncio.Event()
                previous.set()
                self._touch_health()
                drained = asyncio.Event()
                left = asyncio.Event()  # we said goodbye (done_writing): nothing more to write
                try:
                    async with asyncio.TaskGroup() as connections:
                        try:
                            await race(
                                self._heartbeats(call, first.welcome.heartbeat_seconds or 10, left),
                                self._control(call, stub, connections, drained),
                                self._hand_over_on(rotated, handover),
                                self._leave_after_drain(call, drained, handover, left),
                                self._keep_warm(stub, connections, handover),
                            )
                        except RPC_ENDED:
                            if not handover.is_set():
                                raise
                        if handover.is_set():
                            # Renewed: the relay ended this control stream when the next session said
                            # hello. Connections on this channel finish; the TaskGroup waits for them.
                            return
                        # The control stream is gone; connections riding on this channel go with it.
                        raise _SessionOver
                except BaseExceptionGroup as failure:
                    error = unwrap(failure)
                    if not isinstance(error, _SessionOver):
                        raise error from None
            finally:
                call.cancel()

    async def _hand_over_on(self, rotated: asyncio.Event, handover: asyncio.Event) -> None:
        """Once the certificate is renewed, ask for the next session but keep serving this one."""
        await rotated.wait()
        if not handover.is_set():
            self._handover_reason = "certificate renewed"
            handover.set()
        await asyncio.Future()  # until the relay ends this control stream

    async def _leave_after_drain(self, call: Call, drained: asyncio.Event, handover: asyncio.Event,
                                 left: asyncio.Event) -> None:
        """Make before break: once the relay asked to drain, start the next session (through the balancer,
        on another replica) and leave this one only when that one is welcomed; this session's open
        connections go on (the relay keeps them after a drain) until they end."""
        await drained.wait()
        successor = self._welcomed
        if not handover.is_set():
            self._handover_reason = "relay draining"
            handover.set()
        await successor.wait()
        log.info("left the draining relay; its open connections go on", connections=self.open_connections)
        left.set()
        await call.done_writing()  # the relay ends this session, not its connections
        # Served until the relay ends the control stream (it ends the session first, and with it the warm
        # streams no Dial took): a Dial there may take one until it read our goodbye. Cancelling them here
        # raced such a Dial, whose client then saw its connection open and close unanswered (2 of 509
        # connections in a rolling restart of 3 replicas, CI 2026-12-03).
        await asyncio.Future()

    async def _heartbeats(self, call: Call, interval: int, left: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(interval)
            if left.is_set():
                await asyncio.Future()  # until the relay ends the stream
            await call.write(
                tunnel_pb2.AgentMessage(heartbeat=tunnel_pb2.Heartbeat(unix_millis=int(time.time() * 1000)))
            )
            self._touch_health()

    def _touch_health(self) -> None:
        """Touch the health file. A failure is logged (once until it works again), never fatal: the
        tunnel still works, and the readiness probe that reads the file reports the problem."""
        if self.config.health_file is None:
            return
        try:
            self.config.health_file.touch()
        except OSError as exc:
            if not self._health_failing:
                log.warning("health file not written", path=str(self.config.health_file), reason=str(exc))
            self._health_failing = True
        else:
            if self._health_failing:
                log.info("health file written again", path=str(self.config.health_file))
            self._health_failing = False

    async def _control(self, call: Call, stub: RelayCalls, connections: asyncio.TaskGroup,
                       drained: asyncio.Event) -> None:
        while True:
            message = await call.read()
            if not isinstance(message, tunnel_pb2.RelayMessage):  # EOF: the relay ended the stream
                return
            kind = message.WhichOneof("message")
            if kind == "dial":
                connections.create_task(self._carry(stub, message.dial))
            elif kind == "drain":
                log.info("relay asked to drain", reason=message.drain.reason)
                drained.set()  # dials go on being answered here until the next session is up

    async def _carry(self, stub: RelayCalls, dial: tunnel_pb2.DialRequest) -> None:
        """One user connection the relay asked for: relay Accept stream <-> auth proxy Serve stream,
        which starts with the binding (the caller the relay named in the DialRequest)."""
        accept = stub.Accept(metadata=self._metadata((md.DIAL_ID, dial.dial_id)))
        with connection_span("agent.connection", dial.traceparent or None, cluster=self.config.cluster) as traceparent:
            serve = self.config.authproxy.Serve(metadata=((md.TRACEPARENT, traceparent),))
            try:
                await serve.write(_bound_chunk(traceparent, dial))
            except RPC_ENDED:
                pass  # the auth proxy's stream is gone: the splice below finds out and ends the connection
            await self._splice(accept, serve, dial.dial_id)

    async def _keep_warm(self, stub: RelayCalls, connections: asyncio.TaskGroup, handover: asyncio.Event) -> None:
        """Keep ``warm_streams`` pairs of Accept (at the relay) and Serve (at the auth proxy) streams
        open ahead of need; each pair given to a client is replaced at once. Unbound ones end with
        this coroutine: cancelled if the session is over, left to the relay if it handed over
        (agent/warm_pairs.py)."""
        if self.config.warm_streams == 0:
            await asyncio.Future()  # nothing to keep; ending would end the session (race)
        slots = asyncio.Semaphore(self.config.warm_streams)
        unbound = WarmPairs()
        retry = Backoff()
        try:
            while True:
                await slots.acquire()
                if handover.is_set():  # the next session keeps its own pool; none more on this one
                    await asyncio.Future()
                unbound.add(connections.create_task(self._warm(stub, slots, unbound, retry, handover)))
        finally:
            if handover.is_set():
                try:
                    connections.create_task(unbound.retire())
                except RuntimeError:  # the TaskGroup is shutting down (a connection failed): all end now
                    unbound.cancel_all()
            else:
                unbound.cancel_all()

    async def _warm(self, stub: RelayCalls, slots: asyncio.Semaphore, unbound: WarmPairs, retry: Backoff,
                    handover: asyncio.Event) -> None:
        """One warm pair: wait until the relay binds the Accept stream to a client (Chunk{bound}),
        pass the binding (its caller) on to the auth proxy with our span's traceparent, then carry
        the connection."""
        accept = stub.Accept(metadata=self._metadata((md.WARM, "1")))
        # Waits for the auth proxy (instead of failing at once while it starts, e.g. in the same helm
        # install): a warm pair whose Serve stream had already failed would fail the Dial that took it.
        serve = self.config.authproxy.Serve(metadata=((md.WARM, "1"),), wait_for_ready=True)
        try:
            self.warm_waiting += 1
            try:
                first = await self._binding(accept)
            finally:
                self.warm_waiting -= 1
            if first is not None:
                unbound.discard(asyncio.current_task())
                retry.reset()
                slots.release()
                with connection_span("agent.connection", first.bound.traceparent or None,
                                     cluster=self.config.cluster) as traceparent:
                    try:
                        await serve.write(_bound_chunk(traceparent, first.bound))
                    except RPC_ENDED:
                        pass  # the auth proxy's stream is gone: the splice below finds out and ends the connection
                    await self._splice(accept, serve, "warm")
        finally:  # however it went, cancelled (session over, or the relay never ended it) included, the pair ends here
            accept.cancel()
            serve.cancel()
        if first is None:
            if not handover.is_set():  # (handed over: the relay ended it with the session; _keep_warm opens no other)
                # Refused (e.g. a relay without warm streams) or ended: try again later, not in a loop.
                await asyncio.sleep(retry.next_delay())
            unbound.discard(asyncio.current_task())
            slots.release()

    @staticmethod
    async def _binding(accept: Call) -> tunnel_pb2.Chunk | None:
        """The relay's Chunk{bound} once a Dial takes this warm stream; None if refused or ended first."""
        try:
            first = await accept.read()
        except RPC_ENDED:
            return None
        except asyncio.CancelledError:
            if cancelling():  # handed over or session over
                raise
            return None  # the relay ended the warm stream with CANCELLED (grpc.aio raises that as ours)
        if not isinstance(first, bytes):
            return None  # EOF
        try:
            chunk = tunnel_pb2.Chunk.FromString(first)
        except DecodeError:
            log.warning("relay sent a first message that is not a Chunk on a warm stream")
            return None
        return chunk if chunk.HasField("bound") else None  # a first message that is not the binding

    async def _splice(self, accept: Call, serve: Call, label: str) -> None:
        self.open_connections += 1
        self.carried["warm" if label == "warm" else "requested"] += 1
        relay_side, cluster_side = RawChunkStream(accept), RawChunkStream(serve)
        try:
            await splice(relay_side, cluster_side)
            await cluster_side.finish()
            await relay_side.finish()
        except PeerGone as exc:
            log.debug("connection ended abnormally", dial_id=label, reason=str(exc))
        except Exception:  # one broken connection must never take the agent down
            log.exception("connection failed", dial_id=label)
        finally:
            self.open_connections -= 1
            accept.cancel()
            serve.cancel()
