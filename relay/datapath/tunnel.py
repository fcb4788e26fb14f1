"""ClientTunnel and AgentTunnel: the relay's data path. It moves bytes and never parses HTTP.

The Dial and Accept handlers of one connection run in two tasks (one per RPC) and meet only through
the state machines of relay/datapath/pairing.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Never, Protocol, TypeAlias

import grpc

from clusterconnect import metadata as md
from clusterconnect.grpc_options import bearer_from_metadata, metadata_value
from clusterconnect.humanize import ago
from clusterconnect.logs import get_logger
from clusterconnect.metadata import DialRefusal
from clusterconnect.oidc import Identity, principal
from clusterconnect.relay.agent_identity.enrollment import AgentAuthenticator
from clusterconnect.relay.datapath import metrics
from clusterconnect.relay.datapath.connections import ConnectionRegistry, OpenConnection, TooManyConnections
from clusterconnect.relay.datapath.forwarded import read_forward_metadata
from clusterconnect.relay.datapath.pairing import AcceptedStream, SessionGone, StreamEnd
from clusterconnect.relay.datapath.passthrough import AgentStream, PassthroughStream, settle
from clusterconnect.relay.datapath.sessions import AgentSession, EndReason, SessionTable
from clusterconnect.relay.routing.peer import PeerRefused
from clusterconnect.relay.storage.clusters import ClusterStore
from clusterconnect.relay.user_identity.access import DialAuthorizer
from clusterconnect.streams import ByteStream, PeerGone, pump, splice
from clusterconnect.tasks import gather_strict, race
from clusterconnect.tracing import connection_span
from clusterconnect.v1 import tunnel_pb2

log = get_logger(__name__)

# How long a Dial waits for the agent's Accept before telling the client the agent is not answering.
# A connected agent normally answers in milliseconds; a burst of hundreds of new connections can
# take it a few seconds. (An agent that is not connected is reported at once.)
ACCEPT_TIMEOUT = 5.0
# How long a Dial or an agent session waits for a starting replica to register in etcd (a lease grant and
# two writes: milliseconds; seconds on a busy etcd). Under the client proxy's 6 s for a Dial, so that the
# user gets this relay's reason rather than a timeout.
ROUTABLE_TIMEOUT = 4.0

# Dial and Accept are registered raw (passthrough.py): their messages are serialized Chunks.
RawContext: TypeAlias = grpc.aio.ServicerContext[bytes, bytes]
ControlContext: TypeAlias = grpc.aio.ServicerContext[tunnel_pb2.AgentMessage, tunnel_pb2.RelayMessage]

_REASONS = {reason.value for reason in DialRefusal}

# How a refused access check is told to the client.
_ACCESS_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED: DialRefusal.TOKEN_REFUSED,
    grpc.StatusCode.PERMISSION_DENIED: DialRefusal.ACCESS_DENIED,
}


class _PeerLost(Exception):
    pass


class Router(Protocol):
    """The other relay replicas, as the data path needs them (relay/routing/wiring.py builds it)."""

    def claim(self, session: AgentSession) -> None:
        """This replica holds ``session``'s agent now (its route)."""

    def release(self, cluster: str) -> None:
        """This replica no longer holds an agent of ``cluster``."""

    def holder(self, cluster: str, here: bool) -> str:
        """The replica that holds ``cluster``'s agent: this one if ``here``, else the owner of its newest
        route; "" if none."""

    async def forward(self, cluster: str, traceparent: str, caller: tunnel_pb2.Caller, expires_unix: float | None,
                      local: Callable[[], AgentSession | None], timeout: float) -> ByteStream | AgentSession | None:
        """The replica holding ``cluster``'s agent, waited for up to ``timeout``: a Forward stream open to it,
        the local session if one started meanwhile, or None. Raises PeerRefused with the owner's answer."""


class _Revoked(Exception):
    """The connection's identity may no longer reach the cluster (the message says why)."""


def _bound(traceparent: str, caller: tunnel_pb2.Caller) -> bytes:
    """The first message on a warm Accept stream given to a Dial (the relay's streams carry raw bytes)."""
    return tunnel_pb2.Chunk(bound=tunnel_pb2.Bound(traceparent=traceparent, caller=caller)).SerializeToString()


def caller_message(identity: Identity | None) -> tunnel_pb2.Caller:
    """The Dial's caller as the agent and the auth proxy get it: its principal, empty if unverified."""
    if identity is None:
        return tunnel_pb2.Caller()
    issuer, subject, uid = principal(identity)
    return tunnel_pb2.Caller(issuer=issuer, subject=subject, uid=uid)


async def _refuse(context: RawContext, code: grpc.StatusCode, reason: DialRefusal, message: str) -> Never:
    """End a Dial with a status, its one-line message, and the reason as trailing metadata."""
    metrics.refused(reason)
    await context.abort(code, message, trailing_metadata=((md.REASON, reason.value),))


async def _read(context: ControlContext) -> tunnel_pb2.AgentMessage | None:
    """The agent's next control message, or None at the end (grpc's stubs leave EOF out of read())."""
    message: object = await context.read()
    return message if isinstance(message, tunnel_pb2.AgentMessage) else None


class Tunnel:
    """Handlers of ClientTunnel.Dial and AgentTunnel.Connect/Accept (registered in main.py).

    ``authorizer`` checks every Dial against the cluster's access list; ``agent_auth`` tells which
    cluster an agent's call comes from (its client certificate); ``connections`` holds every open
    connection with its caller, so that a revocation can end it, and enforces the connection limits.
    All are required: no Dial or agent call is served without its check.
    """

    def __init__(self, store: ClusterStore, sessions: SessionTable, heartbeat_seconds: int, *,
                 authorizer: DialAuthorizer, agent_auth: AgentAuthenticator,
                 connections: ConnectionRegistry) -> None:
        self.store = store
        self.sessions = sessions
        self.heartbeat_seconds = heartbeat_seconds
        self.authorizer = authorizer
        self.agent_auth = agent_auth
        self.connections = connections
        self.open_connections = 0
        # How dials found their agent stream: a warm one at hand, or a DialRequest round trip.
        self.dials_warm = 0
        self.dials_requested = 0
        # With replicas (relay/routing/): Dials served here, forwarded to the owner, served for a peer.
        self.router: Router | None = None
        # Clear while a replica starts (expect_router): its server listens before it registered in etcd,
        # and until then a Dial would be refused as "not connected" and an agent's session get no route.
        self._routable = asyncio.Event()
        self._routable.set()
        self.dials_local = 0
        self.dials_forwarded = 0
        self.dials_from_peers = 0
        # Set while draining (the message says why): new agent sessions are refused.
        self.draining: str | None = None
        # Set on every connection or session that ends (shutdown waits for them on it).
        self.quieter = asyncio.Event()

    def expect_router(self) -> None:
        """This relay is a replica: Dials and agent sessions wait for ``set_router`` (called before the
        server starts)."""
        self._routable.clear()

    def set_router(self, router: Router | None) -> None:
        self.router = router
        if router is not None:
            self._routable.set()

    async def _until_routable(self) -> bool:
        """True once Dials can be routed; False if the replica did not register in time."""
        if self._routable.is_set():
            return True
        try:
            async with asyncio.timeout(ROUTABLE_TIMEOUT):
                await self._routable.wait()
        except TimeoutError:
            return False
        return True

    # -- clients --------------------------------------------------------------------------------

    async def Dial(self, request_iterator: object, context: RawContext) -> None:
        started = time.perf_counter()
        metadata = context.invocation_metadata()
        cluster = metadata_value(metadata, md.CLUSTER)
        if not cluster:
            await _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, DialRefusal.MISSING_CLUSTER,
                          f"missing {md.CLUSTER} metadata")
        token = bearer_from_metadata(metadata)
        if token is None:
            await _refuse(context, grpc.StatusCode.UNAUTHENTICATED, DialRefusal.MISSING_TOKEN, "missing bearer token")
        # One answer for an unknown cluster and one that does not admit the caller (the authorizer's).
        decision = await self.authorizer.check(cluster, token)
        if not decision.allowed:
            assert decision.code is not None, "a refusal carries its status"
            log.info("dial refused", cluster=cluster, reason=decision.message,
                     user=decision.identity.username if decision.identity else None)
            await _refuse(context, decision.code, _ACCESS_REFUSALS.get(decision.code, DialRefusal.ACCESS_DENIED),
                          decision.message)
        caller = decision.identity
        if not await self._until_routable():
            await _refuse(context, grpc.StatusCode.UNAVAILABLE, DialRefusal.AGENT_NOT_CONNECTED,
                          f"relay replica starting: not registered in etcd within {ROUTABLE_TIMEOUT:g}s")
        session = self._live_session(cluster)
        if session is None and self.router is None:
            await self._refuse_not_connected(context, cluster, caller is not None)
        # Registered with no await since the authorizer's last look at users and lists: a revocation
        # either came before that look (refused above) or finds this connection (ended by it).
        try:
            connection = self.connections.open(cluster, caller, self.authorizer.expires_unix(caller))
        except TooManyConnections as exc:
            log.info("dial refused", cluster=cluster, reason=str(exc), user=caller.username if caller else None)
            await _refuse(context, exc.grpc_status, DialRefusal.TOO_MANY_CONNECTIONS, str(exc))
        try:
            incoming = metadata_value(metadata, md.TRACEPARENT)
            with connection_span("relay.dial", incoming, cluster=cluster) as traceparent:
                try:
                    await self._route(context, session, cluster, traceparent, connection, started)
                except SessionGone:
                    # The agent left the session before it answered (drained to another replica a moment
                    # ago, or gone): nothing reached the client, so once more, where the agent is now.
                    session = self._live_session(cluster)
                    if session is None and self.router is None:
                        await self._refuse_not_connected(context, cluster, caller is not None)
                    try:
                        await self._route(context, session, cluster, traceparent, connection, started)
                    except SessionGone:
                        await self._refuse_not_connected(context, cluster, caller is not None)
        finally:
            self.connections.close(connection)

    async def _route(self, context: RawContext, session: AgentSession | None, cluster: str, traceparent: str,
                     connection: OpenConnection, started: float) -> None:
        if session is None:
            await self._forward(context, cluster, traceparent, connection, started)
        else:
            self.dials_local += 1
            await self._carry(context, session, traceparent, connection, caller_message(connection.caller),
                              started)

    def _live_session(self, cluster: str) -> AgentSession | None:
        """The agent's session here, unless it ended (its Connect handler has yet to take it out of the table):
        a Dial on it would hear SessionGone again."""
        session = self.sessions.get(cluster)
        return session if session is not None and not session.ended.is_set() else None

    async def _refuse_not_connected(self, context: RawContext, cluster: str, verified: bool) -> Never:
        # When the agent was last seen is for callers the relay verified and admitted only.
        await _refuse(context, grpc.StatusCode.UNAVAILABLE, DialRefusal.AGENT_NOT_CONNECTED,
                      self._not_connected(cluster) if verified else f"cluster {cluster} is not connected")

    async def _forward(self, context: RawContext, cluster: str, traceparent: str,
                       connection: OpenConnection, started: float) -> None:
        """No agent of ``cluster`` here: the Dial goes to the replica that holds it (relay/routing/),
        waiting for a route while the agent re-homes. The owner's refusal is the client's answer."""
        assert self.router is not None
        caller = caller_message(connection.caller)
        try:
            found = await self.router.forward(cluster, traceparent, caller, connection.expires_unix,
                                              lambda: self._live_session(cluster), ACCEPT_TIMEOUT)
        except PeerRefused as exc:
            await _refuse(context, exc.code, DialRefusal(exc.reason) if exc.reason in _REASONS
                          else DialRefusal.AGENT_NOT_CONNECTED, exc.details)
        if found is None:
            await self._refuse_not_connected(context, cluster, connection.caller is not None)
        if isinstance(found, AgentSession):  # the agent came here meanwhile
            self.dials_local += 1
            await self._carry(context, found, traceparent, connection, caller, started)
            return
        self.dials_forwarded += 1
        self.open_connections += 1
        try:
            await context.send_initial_metadata(((md.OPEN, "1"),))
            metrics.opened(time.perf_counter() - started, "remote", "forwarded")
            await race(splice(PassthroughStream(context), found), self._revoked(connection))
        except (PeerGone, _Revoked) as exc:
            await self._ended(context, connection, exc, forwarded=True)
        finally:
            await found.close()
            self.open_connections -= 1
            self.quieter.set()

    @staticmethod
    async def _ended(context: RawContext, connection: OpenConnection, exc: Exception, **fields: object) -> None:
        """A carried connection that broke (its peer's stream lost) or was revoked: logged, and the
        client told why unless it is gone already (then it hears nothing more)."""
        cluster = connection.cluster
        if isinstance(exc, _Revoked):
            user = connection.caller.username if connection.caller else None
            log.info("connection ended by revocation", cluster=cluster, user=user, reason=str(exc), **fields)
            if not context.done():
                await _refuse(context, grpc.StatusCode.PERMISSION_DENIED, DialRefusal.ACCESS_REVOKED,
                              f"connection to cluster {cluster} ended: {exc}")
            return
        log.info("connection lost", cluster=cluster, reason=str(exc), **fields)
        if not context.done():
            await _refuse(context, grpc.StatusCode.UNAVAILABLE, DialRefusal.CONNECTION_LOST,
                          f"connection to cluster {cluster} lost")

    async def Forward(self, request_iterator: object, context: RawContext) -> None:
        """RelayPeer.Forward (peer.proto), on the replica holding the agent: the local Dial without its
        authorization, which the entry replica did. The caller it verified goes to the agent, and the
        connection ends at its token's expiry. It is not in this replica's ConnectionRegistry: the
        entry replica's holds it, counts it against the limits and ends it on revocation (which
        ends this call); here it would be an unverified caller, which an access change ends."""
        started = time.perf_counter()
        request = read_forward_metadata(context.invocation_metadata())
        if isinstance(request, str):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request)
        cluster = request.cluster
        session = self._live_session(cluster)
        if session is None:
            await self._refuse_not_connected(context, cluster, bool(request.caller.subject))
        self.dials_from_peers += 1
        connection = OpenConnection(cluster, None, request.expires_unix)
        with connection_span("relay.forwarded", request.traceparent or None, cluster=cluster) as traceparent:
            try:
                await self._carry(context, session, traceparent, connection, request.caller, started, "from_peer")
            except SessionGone:  # the entry replica leaves this route out and waits for the agent's next one
                await self._refuse_not_connected(context, cluster, bool(request.caller.subject))

    async def _carry(self, context: RawContext, session: AgentSession, traceparent: str,
                     connection: OpenConnection, caller: tunnel_pb2.Caller, started: float,
                     route: str = "local") -> None:
        accepted, stream = await self._open(session, context, traceparent, caller)
        self.open_connections += 1
        session.active.add(accepted)
        end = StreamEnd.ABANDONED
        try:  # from here on, however this ends, the agent's stream is ended (and its Accept handler told)
            await context.send_initial_metadata(((md.OPEN, "1"),))
            metrics.opened(time.perf_counter() - started, stream, route)
            await race(self._splice(PassthroughStream(context), accepted), self._lost(accepted),
                       self._revoked(connection))
            end = StreamEnd.CLEAN
        except (_PeerLost, PeerGone, _Revoked) as exc:
            await self._ended(context, connection, exc)
        finally:
            accepted.end(end)
            session.active.discard(accepted)
            self.open_connections -= 1
            self.quieter.set()

    @staticmethod
    async def _splice(client: PassthroughStream, accepted: AcceptedStream) -> None:
        """Both directions of a connection, each written by the handler of its own call: the agent's
        bytes to the client here, the client's to the agent by the Accept handler (``_toward_agent``).
        Over when both are; a break of either ends it (PeerGone)."""
        if not accepted.join(client):
            raise _PeerLost("agent stream ended before the splice")
        await gather_strict(pump(accepted.stream, client, 1), accepted.wait_forwarded())

    def holder(self, cluster: str) -> str:
        """The replica holding ``cluster``'s agent ("" with a single relay, or nowhere)."""
        if self.router is None:
            return ""
        return self.router.holder(cluster, here=self.sessions.get(cluster) is not None)

    def end_sessions(self, reason: EndReason) -> None:
        """End every agent session (their Connect calls return): before the server stops, so that
        grpc does not cancel the handlers under us (it logs each as an unhandled CancelledError)."""
        for session in self.sessions.all():
            session.end(reason)

    async def wait_quiet(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait up to ``timeout`` until ``done()`` (checked whenever a connection or a session ends)."""
        try:
            async with asyncio.timeout(timeout):
                while not done():
                    self.quieter.clear()
                    await self.quieter.wait()
        except TimeoutError:
            return done()
        return True

    @staticmethod
    async def _revoked(connection: OpenConnection) -> None:
        """Ends (raising) once the connection's identity is revoked or its token expired."""
        raise _Revoked(await connection.wait_revoked())

    async def _open(self, session: AgentSession, context: RawContext, traceparent: str,
                    caller: tunnel_pb2.Caller) -> tuple[AcceptedStream, str]:
        """The agent's stream for this Dial: a warm one at hand, else one the agent opens on request
        (and which of the two: "warm" or "requested"). A stream handed over here is the caller's to
        end; one that is not, is ended here."""
        while (warm := session.take_warm(traceparent, caller)) is not None:
            try:
                usable = await warm.wait_bound()
            except BaseException:  # the Dial was cancelled meanwhile: the warm stream goes with it
                warm.end(StreamEnd.ABANDONED)
                raise
            if usable:
                self.dials_warm += 1
                return warm, "warm"
        if session.gone:
            raise SessionGone(f"the session of cluster {session.cluster}'s agent ended")  # nobody reads its outbox
        self.dials_requested += 1
        try:
            dial = session.request_dial(traceparent, caller)
        except asyncio.QueueFull:
            await _refuse(context, grpc.StatusCode.UNAVAILABLE, DialRefusal.AGENT_OVERLOADED,
                          f"agent of cluster {session.cluster} is overloaded")
        try:
            return await dial.wait_accepted(ACCEPT_TIMEOUT), "requested"
        except SessionGone:
            raise  # the session let its dials go as it ended
        except TimeoutError:
            dial.abandon()
            await _refuse(context, grpc.StatusCode.UNAVAILABLE, DialRefusal.AGENT_NOT_ANSWERING,
                          f"agent of cluster {session.cluster} did not answer within {ACCEPT_TIMEOUT:g}s")
        except BaseException:
            dial.abandon()  # cancelled, maybe just as the agent's Accept arrived: that stream ends too
            raise
        finally:
            session.dials.forget(dial)

    @staticmethod
    async def _lost(accepted: AcceptedStream) -> None:
        """Ends (raising) when the agent's stream ends from its side while the splice runs."""
        end = await accepted.wait_ended()
        raise _PeerLost(f"agent stream ended ({end.value})")

    def _not_connected(self, cluster: str) -> str:
        seen = self.sessions.last_seen.get(cluster)
        if seen is None:
            record = self.store.get(cluster)
            seen = record.last_seen_unix if record and record.last_seen_unix else None
        when = f"agent last seen {ago(time.time() - seen)}" if seen else "agent never connected"
        return f"cluster {cluster} is not connected ({when})"

    # -- agents ---------------------------------------------------------------------------------

    async def _authenticate_agent(self, context: RawContext | ControlContext) -> str:
        # The agent's client certificate names its cluster (relay/agent_identity/pki.py); the claim must match.
        cluster = metadata_value(context.invocation_metadata(), md.CLUSTER)
        if not cluster:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"missing {md.CLUSTER} metadata")
        await self.agent_auth.authenticate(context, cluster)
        return cluster

    async def Connect(self, request_iterator: object, context: ControlContext) -> None:
        cluster = await self._authenticate_agent(context)
        if self.draining is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.draining)
        if not await self._until_routable():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "relay replica starting: not registered in etcd"
                                f" within {ROUTABLE_TIMEOUT:g}s; connect to another replica")
        first = await _read(context)
        if first is None or first.WhichOneof("message") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first message must be hello")
        hello = first.hello
        if hello.cluster != cluster:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"hello names cluster {hello.cluster!r} but the certificate is for {cluster!r}",
            )
        session = AgentSession(cluster, hello.agent_version[:64], hello.kubernetes_version[:64])
        self.store.note_seen(cluster, int(session.last_seen), session.agent_version, session.kubernetes_version)
        self.sessions.add(session)
        if self.router is not None:
            self.router.claim(session)
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
            if self.router is not None and self.sessions.get(cluster) is None:
                self.router.release(cluster)  # a newer session of this agent here keeps the route
            self.quieter.set()
            if not session.ended.is_set():  # a session replaced by a newer one keeps its connections
                session.end(EndReason.DISCONNECTED)
            reason = session.end_reason.value if session.end_reason else None
            if session.end_reason is not None:
                metrics.session_ended(session.end_reason)
            log.info("agent disconnected", cluster=cluster, reason=reason)
        if session.end_reason is EndReason.CLUSTER_REMOVED:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"cluster {cluster} was removed")

    @staticmethod
    async def _receive_heartbeats(session: AgentSession, context: ControlContext) -> None:
        while True:
            message = await _read(context)
            if message is None:
                if session.draining:  # gone to its next session: what it carries here finishes
                    session.end(EndReason.DRAINED, drop_connections=False)
                else:
                    session.end(EndReason.AGENT_CLOSED)
                return
            session.last_seen = time.time()

    @staticmethod
    async def _send_control(session: AgentSession, context: ControlContext) -> None:
        while True:
            message = await session.outbox.get()
            await context.write(message)

    async def _watchdog(self, session: AgentSession) -> None:
        limit = 3 * self.heartbeat_seconds
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            if time.time() - session.last_seen > limit:
                session.end(EndReason.HEARTBEAT_MISSED)
                return

    async def Accept(self, request_iterator: object, context: RawContext) -> None:
        cluster = await self._authenticate_agent(context)
        metadata = context.invocation_metadata()
        session = self.sessions.get(cluster)
        stream = AgentStream(context)
        if metadata_value(metadata, md.WARM) == "1":
            if session is None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no control stream for this cluster")
            accepted = AcceptedStream.warm(stream)
            if not session.add_warm(accepted):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "enough warm streams for this agent")
        else:
            dial_id = metadata_value(metadata, md.DIAL_ID) or ""
            if session is not None:
                # Before the pump toward the agent may write: its first write (from its own task) and
                # our abort would both send the initial metadata, and grpc refuses the second
                # (ExecuteBatchError: GRPC_CALL_ERROR_TOO_MANY_OPERATIONS). A warm stream's first
                # write is Chunk{bound}, from this task.
                await context.send_initial_metadata(())
            answered = session.dials.accept(dial_id, stream) if session is not None else None
            if answered is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, "no dial is waiting for this id")
            accepted = answered
        toward_agent: asyncio.Task[None] | None = None  # this handler's own: it ends it in settle()
        try:
            try:
                if await accepted.wait_taken():
                    await self._bind(accepted)
                client = await accepted.wait_joined()
                if client is not None:
                    toward_agent = asyncio.create_task(self._toward_agent(client, accepted, stream))
                end = await accepted.wait_ended()
            except asyncio.CancelledError:  # the agent's call ended (or the server stops)
                accepted.end(StreamEnd.LOST)
                raise
            finally:
                if session is not None:
                    session.discard_warm(accepted)
            await self._end_accept(context, end)
        finally:
            await settle(toward_agent, stream)  # a write in flight ends with this call

    @staticmethod
    async def _toward_agent(client: ByteStream, accepted: AcceptedStream, stream: AgentStream) -> None:
        """The client's bytes to the agent, from the Accept handler's side; the Dial hears how it ended."""
        try:
            await pump(client, stream, 0)
        except PeerGone as exc:
            accepted.forwarded(exc)
        except grpc.aio.AbortError:  # a write in flight when this handler aborted its call (_end_accept)
            accepted.forwarded(PeerGone("the agent's call was ended"))
        except Exception as exc:  # a bug here must end this connection, not leave the Dial waiting
            log.exception("relay: pump toward the agent failed")
            accepted.forwarded(PeerGone(f"relay error: {type(exc).__name__}"))
        else:
            accepted.forwarded(None)

    @staticmethod
    async def _bind(accepted: AcceptedStream) -> None:
        """A warm stream a Dial took: tell the agent (Chunk{bound}) from this task, then let it splice."""
        try:
            await accepted.stream.send(_bound(accepted.traceparent, accepted.caller))
        except PeerGone:
            accepted.end(StreamEnd.LOST)
            return
        accepted.bound()

    @staticmethod
    async def _end_accept(context: RawContext, end: StreamEnd) -> None:
        """The connection is over: end the agent's call with OK if it ended in order, else CANCELLED.
        A call that is over already is left alone: aborting it again makes grpc log a traceback."""
        if end is StreamEnd.CLEAN or context.done() or context.cancelled():
            return
        await context.abort(grpc.StatusCode.CANCELLED, "client connection ended")
