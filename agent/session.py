"""The agent's outbound session: control stream to the relay, one Accept stream per dialled connection."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from clusterconnect import __version__
from clusterconnect import metadata as md
from clusterconnect.agent.backoff import Backoff
from clusterconnect.agent.enrollment import Enrolled
from clusterconnect.grpc_options import CHANNEL_OPTIONS
from clusterconnect.logs import get_logger
from clusterconnect.streams import GrpcClientStream, PeerGone, splice
from clusterconnect.tasks import cancelling, race, unwrap
from clusterconnect.tracing import connection_span
from clusterconnect.v1 import tunnel_pb2, tunnel_pb2_grpc

log = get_logger(__name__)

# A session that stayed up this long counts as healthy: the next failure starts backoff afresh.
HEALTHY_AFTER = 10.0


class _SessionOver(Exception):
    pass


@dataclass
class AgentConfig:
    cluster: str
    # The agent's certificate and the relay's CA; the tunnel goes to enrolled.agent_target (mutual TLS).
    enrolled: Enrolled
    authproxy: tunnel_pb2_grpc.AuthProxyStub
    # Touched while the control stream is healthy, for an exec readiness probe in Kubernetes.
    health_file: Path | None = None
    # Accept (relay) + Serve (auth proxy) pairs kept open ahead of need, so a Dial needs no round trip to us.
    warm_streams: int = 2


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.open_connections = 0
        self.connected = asyncio.Event()

    def _metadata(self, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        # No credential: the relay knows the agent by its client certificate.
        return ((md.CLUSTER, self.config.cluster), *extra)

    async def run_forever(self) -> None:
        draining: set[asyncio.Task] = set()
        renewals = asyncio.create_task(self.config.enrolled.renew_forever())
        try:
            await self._sessions(draining)
        finally:
            renewals.cancel()
            for task in draining:
                task.cancel()
            await asyncio.gather(renewals, *draining, return_exceptions=True)

    async def _sessions(self, draining: set[asyncio.Task]) -> None:
        """One session after another. A session whose certificate was renewed hands over: the next one
        starts at once with the new certificate while the old one finishes its connections."""
        backoff = Backoff()
        while True:
            started = time.monotonic()
            handover = asyncio.Event()
            session = asyncio.create_task(self._session(handover))
            handed_over = asyncio.create_task(handover.wait())
            try:
                await asyncio.wait((session, handed_over), return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                session.cancel()
                handed_over.cancel()
                await asyncio.gather(session, handed_over, return_exceptions=True)
                raise
            handed_over.cancel()
            if handover.is_set() and not session.done():
                log.info("certificate renewed; reconnecting with it, connections on the old one go on")
                draining.add(session)
                session.add_done_callback(self._drained(draining))
                backoff.reset()
                continue
            try:
                session.result()
                reason = "relay ended the session"
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
            except PeerGone as exc:
                reason = str(exc)
            self.connected.clear()
            if time.monotonic() - started > HEALTHY_AFTER:
                backoff.reset()
            delay = backoff.next_delay()
            log.warning("relay session ended; reconnecting", reason=reason, retry_in=round(delay, 2))
            await asyncio.sleep(delay)

    async def _kubernetes_version(self) -> str:
        try:
            info = await self.config.authproxy.Info(tunnel_pb2.InfoRequest(), timeout=3)
            return info.kubernetes_version
        except grpc.aio.AioRpcError as exc:
            log.warning("auth proxy not reachable", reason=f"{exc.code().name}: {exc.details()}")
            return ""

    @staticmethod
    def _drained(draining: set[asyncio.Task]):
        def done(task: asyncio.Task) -> None:
            draining.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.debug("old session ended", reason=str(task.exception()))
        return done

    async def _session(self, handover: asyncio.Event) -> None:
        enrolled = self.config.enrolled
        rotated = enrolled.rotated  # taken before the certificate, so no renewal goes unnoticed
        # A channel of its own (no shared subchannel): a session must really use its certificate.
        options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.secure_channel(
            enrolled.agent_target, enrolled.channel_credentials(), options=options
        ) as channel:
            stub = tunnel_pb2_grpc.AgentTunnelStub(channel)
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
                log.info("connected to relay", relay=enrolled.agent_target, cluster=self.config.cluster,
                         certificate_serial=format(enrolled.identity.serial, "x"))
                self.connected.set()
                self._touch_health()
                try:
                    async with asyncio.TaskGroup() as connections:
                        try:
                            await race(
                                self._heartbeats(call, first.welcome.heartbeat_seconds or 10),
                                self._control(call, stub, connections),
                                self._hand_over_on(rotated, handover),
                                self._keep_warm(stub, connections),
                            )
                        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
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

    @staticmethod
    async def _hand_over_on(rotated: asyncio.Event, handover: asyncio.Event) -> None:
        """Once the certificate is renewed, ask for the next session but keep serving this one."""
        await rotated.wait()
        handover.set()
        await asyncio.Future()  # until the relay ends this control stream

    async def _heartbeats(self, call, interval: int) -> None:
        while True:
            await asyncio.sleep(interval)
            await call.write(
                tunnel_pb2.AgentMessage(heartbeat=tunnel_pb2.Heartbeat(unix_millis=int(time.time() * 1000)))
            )
            self._touch_health()

    def _touch_health(self) -> None:
        if self.config.health_file is not None:
            self.config.health_file.touch()

    async def _control(self, call, stub, connections: asyncio.TaskGroup) -> None:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                return
            kind = message.WhichOneof("message")
            if kind == "dial":
                connections.create_task(self._carry(stub, message.dial))
            elif kind == "drain":
                log.info("relay asked to drain", reason=message.drain.reason)
                return

    async def _carry(self, stub, dial: tunnel_pb2.DialRequest) -> None:
        """One user connection the relay asked for: relay Accept stream <-> auth proxy Serve stream."""
        accept = stub.Accept(metadata=self._metadata((md.DIAL_ID, dial.dial_id)))
        with connection_span("agent.connection", dial.traceparent or None, cluster=self.config.cluster) as traceparent:
            serve = self.config.authproxy.Serve(metadata=((md.TRACEPARENT, traceparent),))
            await self._splice(accept, serve, dial.dial_id)

    async def _keep_warm(self, stub, connections: asyncio.TaskGroup) -> None:
        """Keep ``warm_streams`` pairs of Accept (at the relay) and Serve (at the auth proxy) streams
        open ahead of need; each pair given to a client is replaced at once. Unbound ones end with
        this coroutine (session over or handed over)."""
        if self.config.warm_streams == 0:
            await asyncio.Future()  # nothing to keep; ending would end the session (race)
        slots = asyncio.Semaphore(self.config.warm_streams)
        unbound: set[asyncio.Task] = set()
        retry = Backoff()
        try:
            while True:
                await slots.acquire()
                unbound.add(connections.create_task(self._warm(stub, slots, unbound, retry)))
        finally:
            for task in unbound:
                task.cancel()

    async def _warm(self, stub, slots: asyncio.Semaphore, unbound: set[asyncio.Task], retry: Backoff) -> None:
        """One warm pair: wait until the relay binds the Accept stream to a client (Chunk{bound}),
        pass the binding on to the auth proxy with our span's traceparent, then carry the connection."""
        accept = stub.Accept(metadata=self._metadata((md.WARM, "1")))
        serve = self.config.authproxy.Serve(metadata=((md.WARM, "1"),))
        try:
            first = await self._binding(accept)
            if first is not None:
                unbound.discard(asyncio.current_task())
                retry.reset()
                slots.release()
                with connection_span("agent.connection", first.bound.traceparent or None,
                                     cluster=self.config.cluster) as traceparent:
                    try:
                        await serve.write(tunnel_pb2.Chunk(bound=tunnel_pb2.Bound(traceparent=traceparent)))
                    except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                        pass  # the auth proxy's stream is gone: the splice below finds out and ends the connection
                    await self._splice(accept, serve, "warm")
        finally:  # however it went, cancelled (handed over, session over) included, the pair ends here
            accept.cancel()
            serve.cancel()
        if first is None:
            # Refused (e.g. a relay without warm streams) or ended: try again later, not in a loop.
            await asyncio.sleep(retry.next_delay())
            unbound.discard(asyncio.current_task())
            slots.release()

    @staticmethod
    async def _binding(accept: grpc.aio.StreamStreamCall) -> tunnel_pb2.Chunk | None:
        """The relay's Chunk{bound} once a Dial takes this warm stream; None if refused or ended first."""
        try:
            first = await accept.read()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            return None
        except asyncio.CancelledError:
            if cancelling():  # handed over or session over
                raise
            return None  # the relay ended the warm stream with CANCELLED (grpc.aio raises that as ours)
        return first if first is not grpc.aio.EOF and first.HasField("bound") else None

    async def _splice(self, accept: grpc.aio.StreamStreamCall, serve: grpc.aio.StreamStreamCall, label: str) -> None:
        self.open_connections += 1
        relay_side, cluster_side = GrpcClientStream(accept), GrpcClientStream(serve)
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
