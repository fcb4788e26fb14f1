"""ClientTunnel and AgentTunnel: the relay's data path. It moves bytes and never parses HTTP."""

from __future__ import annotations

import asyncio
import time

import grpc

from clusterconnect import metadata as md
from clusterconnect.grpc_options import bearer_from_metadata, metadata_value
from clusterconnect.humanize import ago
from clusterconnect.logs import get_logger
from clusterconnect.relay.datapath.passthrough import ForeignPassthroughStream, PassthroughStream
from clusterconnect.relay.datapath.sessions import AcceptedStream, AgentSession, SessionTable
from clusterconnect.relay.storage.clusters import ClusterStore
from clusterconnect.streams import PeerGone, splice
from clusterconnect.tasks import race
from clusterconnect.tracing import connection_span
from clusterconnect.v1 import tunnel_pb2

log = get_logger(__name__)

# How long a Dial waits for the agent's Accept before telling the client the agent is not answering.
# A connected agent normally answers in milliseconds; a burst of hundreds of new connections can
# take it a few seconds. (An agent that is not connected is reported at once.)
ACCEPT_TIMEOUT = 5.0


class _PeerLost(Exception):
    pass


def _bound(traceparent: str) -> bytes:
    """The first message on a warm Accept stream given to a Dial (the relay's streams carry raw bytes)."""
    return tunnel_pb2.Chunk(bound=tunnel_pb2.Bound(traceparent=traceparent)).SerializeToString()


class Tunnel:
    """Handlers of ClientTunnel.Dial and AgentTunnel.Connect/Accept (registered in main.py)."""

    # relay.access.DialAuthorizer: the per-cluster access list check (set in main.py).
    authorizer = None
    # relay.enrollment.AgentEnrollment: agents' identity from their client certificates (set in main.py).
    agent_auth = None

    def __init__(self, store: ClusterStore, sessions: SessionTable, heartbeat_seconds: int) -> None:
        self.store = store
        self.sessions = sessions
        self.heartbeat_seconds = heartbeat_seconds
        self.open_connections = 0
        # How dials found their agent stream: a warm one at hand, or a DialRequest round trip.
        self.dials_warm = 0
        self.dials_requested = 0

    # -- clients --------------------------------------------------------------------------------

    async def Dial(self, request_iterator, context: grpc.aio.ServicerContext):
        metadata = context.invocation_metadata()
        cluster = metadata_value(metadata, md.CLUSTER)
        if not cluster:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"missing {md.CLUSTER} metadata")
        token = bearer_from_metadata(metadata)
        if token is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        if self.store.get(cluster) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"cluster {cluster} is not registered")
        if self.authorizer is not None:
            decision = await self.authorizer.check(cluster, token)
            if not decision.allowed:
                log.info("dial refused", cluster=cluster, reason=decision.message,
                         user=decision.identity.username if decision.identity else None)
                await context.abort(getattr(grpc.StatusCode, decision.code), decision.message)
        session = self.sessions.get(cluster)
        if session is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._not_connected(cluster))
        incoming = metadata_value(metadata, md.TRACEPARENT)
        with connection_span("relay.dial", incoming, cluster=cluster) as traceparent:
            await self._carry(context, session, traceparent)

    async def _carry(self, context: grpc.aio.ServicerContext, session: AgentSession, traceparent: str) -> None:
        cluster = session.cluster
        accepted = await self._open(session, context, traceparent)
        self.open_connections += 1
        session.active.add(accepted)
        clean = False
        try:  # from here on, however this ends, the agent's stream is told (accepted.finish)
            await context.send_initial_metadata(((md.OPEN, "1"),))
            await race(splice(PassthroughStream(context), accepted.stream), self._lost(accepted))
            clean = True
        except (_PeerLost, PeerGone) as exc:
            log.info("connection lost", cluster=cluster, reason=str(exc))
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"connection to cluster {cluster} lost")
        finally:
            accepted.finish(clean)
            session.active.discard(accepted)
            self.open_connections -= 1

    async def _open(self, session: AgentSession, context: grpc.aio.ServicerContext, traceparent: str) -> AcceptedStream:
        """The agent's stream for this Dial: a warm one at hand, else one the agent opens on request.
        A stream handed over here is the caller's to finish; one that is not, is finished here."""
        while (warm := session.take_warm()) is not None:
            warm.binding.set_result(traceparent)
            try:
                usable = await warm.ready
            except BaseException:  # the Dial was cancelled meanwhile: the warm stream goes with it
                warm.finish(False)
                raise
            if not usable:
                warm.finish(False)
                continue
            self.dials_warm += 1
            return warm
        self.dials_requested += 1
        try:
            dial_id, future = session.request_dial(traceparent)
        except asyncio.QueueFull:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"agent of cluster {session.cluster} is overloaded"
            )
        try:
            return await asyncio.wait_for(future, ACCEPT_TIMEOUT)
        except asyncio.CancelledError:
            # Cancelled just as the agent's Accept arrived: end that stream too, or it waits for ever.
            if future.done() and not future.cancelled():
                future.result().finish(False)
            raise
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"agent of cluster {session.cluster} did not answer within {ACCEPT_TIMEOUT:g}s",
            )
        finally:
            session.pending.pop(dial_id, None)

    @staticmethod
    async def _bind_when_dialled(accepted: AcceptedStream) -> None:
        """A warm stream waits for a Dial; then it tells the agent (Chunk{bound}) from this task."""
        await asyncio.wait((accepted.binding, accepted.finished), return_when=asyncio.FIRST_COMPLETED)
        if not accepted.binding.done():
            return  # ended before a Dial took it (its session ended)
        try:
            await accepted.stream.send(_bound(accepted.binding.result()))
        except PeerGone:
            accepted.ready.set_result(False)
            accepted.finish(False)
            return
        accepted.ready.set_result(True)

    @staticmethod
    async def _lost(accepted: AcceptedStream) -> None:
        await accepted.peer_lost.wait()
        raise _PeerLost("agent stream ended")

    def _not_connected(self, cluster: str) -> str:
        seen = self.sessions.last_seen.get(cluster)
        if seen is None:
            record = self.store.get(cluster)
            seen = record.last_seen_unix if record and record.last_seen_unix else None
        when = f"agent last seen {ago(time.time() - seen)}" if seen else "agent never connected"
        return f"cluster {cluster} is not connected ({when})"

    # -- agents ---------------------------------------------------------------------------------

    async def _authenticate_agent(self, context: grpc.aio.ServicerContext) -> str:
        # The agent's client certificate names its cluster (relay/agent_identity/enrollment.py); the claim must match.
        cluster = metadata_value(context.invocation_metadata(), md.CLUSTER)
        if not cluster:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"missing {md.CLUSTER} metadata")
        if self.agent_auth is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "agent authentication is not configured")
        await self.agent_auth.authenticate(context, cluster)
        return cluster

    async def Connect(self, request_iterator, context: grpc.aio.ServicerContext):
        cluster = await self._authenticate_agent(context)
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("message") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first message must be hello")
        hello = first.hello
        if hello.cluster != cluster:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"hello names cluster {hello.cluster!r} but the certificate is for {cluster!r}",
            )
        session = AgentSession(cluster, hello.agent_version[:64], hello.kubernetes_version[:64])
        self.sessions.add(session)
        log.info("agent connected", cluster=cluster, agent_version=session.agent_version,
                 kubernetes_version=session.kubernetes_version, peer=context.peer())
        try:
            await context.write(
                tunnel_pb2.RelayMessage(
                    welcome=tunnel_pb2.Welcome(heartbeat_seconds=self.heartbeat_seconds)
                )
            )
            await race(
                self._receive_heartbeats(session, context),
                self._send_control(session, context),
                self._watchdog(session),
                session.ended.wait(),
            )
        finally:
            self.sessions.discard(session)
            if not session.ended.is_set():  # a session replaced by a newer one keeps its connections
                session.end(session.end_reason or "agent disconnected")
            self.store.record_seen(cluster, int(session.last_seen), session.agent_version,
                                   session.kubernetes_version)
            log.info("agent disconnected", cluster=cluster, reason=session.end_reason)
        if session.end_reason.startswith("cluster removed"):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"cluster {cluster} was removed")

    async def _receive_heartbeats(self, session: AgentSession, context) -> None:
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                session.end_reason = "agent closed its stream"
                return
            session.last_seen = time.time()

    @staticmethod
    async def _send_control(session: AgentSession, context) -> None:
        while True:
            message = await session.outbox.get()
            await context.write(message)

    async def _watchdog(self, session: AgentSession) -> None:
        limit = 3 * self.heartbeat_seconds
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            if time.time() - session.last_seen > limit:
                session.end_reason = f"no heartbeat for {limit}s"
                return

    async def Accept(self, request_iterator, context: grpc.aio.ServicerContext):
        cluster = await self._authenticate_agent(context)
        metadata = context.invocation_metadata()
        session = self.sessions.get(cluster)
        accepted = AcceptedStream(ForeignPassthroughStream(context))
        warm = metadata_value(metadata, md.WARM) == "1"
        if warm:
            if session is None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no control stream for this cluster")
            if not session.add_warm(accepted):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "enough warm streams for this agent")
        else:
            dial_id = metadata_value(metadata, md.DIAL_ID) or ""
            future = session.pending.get(dial_id) if session else None
            if future is None or future.done():
                await context.abort(grpc.StatusCode.NOT_FOUND, "no dial is waiting for this id")
            future.set_result(accepted)
        try:
            if warm:
                await self._bind_when_dialled(accepted)
            clean = await accepted.finished
        except asyncio.CancelledError:
            accepted.peer_lost.set()
            raise
        finally:
            if session is not None:
                session.discard_warm(accepted)
            if not accepted.ready.done():
                accepted.ready.set_result(False)
        if not clean:
            await context.abort(grpc.StatusCode.CANCELLED, "client connection ended")
