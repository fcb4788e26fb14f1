"""The client proxy's data path: each TLS connection from kubectl becomes one ClientTunnel.Dial stream."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import trace

from clusterconnect import metadata as md
from clusterconnect.clientproxy.request_head import FirstRequestHead, RequestHeadTimeout, request_timeout_response
from clusterconnect.credentials import CachedTokenSource, LoginError
from clusterconnect.dial_refusals import DIAL_TIMEOUT, DIAL_TIMEOUT_CONNECTED, Refused, refuse, wait_open
from clusterconnect.grpc_options import bearer
from clusterconnect.logs import get_logger
from clusterconnect.socket_stream import SocketStream
from clusterconnect.streams import GrpcClientStream, PeerGone, splice
from clusterconnect.tasks import ConnectionTasks
from clusterconnect.tracing import start_connection_span
from clusterconnect.v1 import tunnel_pb2_grpc

log = get_logger(__name__)

# A Dial stream (the generated stubs are unannotated: bytes chunks of tunnel_pb2.Chunk either way).
Call = grpc.aio.StreamStreamCall[Any, Any]

# A client that has not finished its TLS handshake by then is dropped (and so is its early Dial).
HANDSHAKE_TIMEOUT = 10.0
# A client that has not sent the head of its first request by then, counted from the end of its
# handshake, is dropped too (clientproxy/request_head.py). kubectl writes the head at once after the
# handshake, so on loopback it arrives within a millisecond; the rest is room for a loaded machine
# (seconds of scheduling delay). What arrives while the Dial is still opening waits in the socket's
# buffer and counts as in time. A connection kubectl dialled and then left unused in its pool is
# dropped as well; kubectl notices and dials anew. What it bounds: each connection holds a Dial end to end.
REQUEST_HEAD_TIMEOUT = 10.0


@dataclass
class TunnelTarget:
    relay: str  # as the user wrote it, for messages
    cluster: str
    token: str
    # The user's login instead of a fixed token: a fresh token for each Dial.
    login: CachedTokenSource | None = None

    async def current_token(self) -> str:
        return await self.login.get() if self.login is not None else self.token

    def token_at_hand(self) -> str | None:
        """The token without waiting, unless the login's token must be refreshed first."""
        return self.login.cached() if self.login is not None else self.token


@dataclass
class _Accepted:
    """What was started for a TCP connection when it was accepted, before its TLS handshake."""

    span: trace.Span
    traceparent: str
    connected: bool  # the channel to the relay was ready when the Dial went out
    call: Call | None = None  # None: no token at hand; dial after the handshake
    expiry: asyncio.TimerHandle | None = None
    claimed: bool = False  # the handler took over (or the Dial was dropped): nothing left to expire


class ConnectionHandler:
    """Serves the local endpoint: ``loop.create_server(handler.protocol, ssl=..., ssl_handshake_timeout=
    HANDSHAKE_TIMEOUT)``. The protocol is made when TCP accepts, before the TLS handshake: the Dial goes
    out then, and the path through the relay opens while the handshake runs."""

    def __init__(self, channel: grpc.aio.Channel, target: TunnelTarget,
                 request_head_timeout: float = REQUEST_HEAD_TIMEOUT) -> None:
        self.channel = channel
        self.stub = tunnel_pb2_grpc.ClientTunnelStub(channel)
        self.target = target
        self.request_head_timeout = request_head_timeout
        self.open_connections = 0
        self.connections_served = 0
        self._connections = ConnectionTasks()

    def serving(self) -> contextlib.AbstractAsyncContextManager[None]:
        """While this runs, accepted connections are served; when it ends they are cancelled and awaited."""
        return self._connections.serving()

    def protocol(self) -> SocketStream:
        accepted = self._dial_early()
        protocol = SocketStream(on_connected=lambda stream: self._start(accepted, stream))
        # A failed handshake never reaches the handler, and nothing tells us but the protocol being
        # dropped: then its Dial goes too (and at the latest once the handshake would have timed out).
        weakref.finalize(protocol, self._expire, accepted).atexit = False
        accepted.expiry = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._expire, accepted)
        return protocol

    def _dial_early(self) -> _Accepted:
        span, traceparent = start_connection_span("clientproxy.connection", cluster=self.target.cluster)
        accepted = _Accepted(span, traceparent, self.channel.get_state() == grpc.ChannelConnectivity.READY)
        token = self.target.token_at_hand()
        if token is not None:
            accepted.call = self._dial(token, traceparent)
        return accepted

    def _dial(self, token: str, traceparent: str) -> Call:
        call: Call = self.stub.Dial(
            metadata=((md.CLUSTER, self.target.cluster), bearer(token), (md.TRACEPARENT, traceparent))
        )
        return call

    @staticmethod
    def _claim(accepted: _Accepted) -> bool:
        """Take the accepted connection over, once: by its handler, or by expiry; False if already taken."""
        if accepted.claimed:
            return False
        accepted.claimed = True
        if accepted.expiry is not None:
            accepted.expiry.cancel()
        return True

    @classmethod
    def _expire(cls, accepted: _Accepted) -> None:
        if cls._claim(accepted):
            # kubectl only says "EOF" (asyncio sends no TLS alert): the reason is here.
            log.info("connection dropped", reason="no TLS handshake: the client presented no certificate of"
                     " this proxy's kubeconfig, gave up, or timed out")
            cls._expire_now(accepted)

    @staticmethod
    def _expire_now(accepted: _Accepted) -> None:
        if accepted.call is not None:
            accepted.call.cancel()
        accepted.span.end()

    def _start(self, accepted: _Accepted, downstream: SocketStream) -> None:
        """The TLS handshake is done: serve the connection."""
        if not self._claim(accepted):  # the handshake outlasted HANDSHAKE_TIMEOUT after all: the Dial is gone
            downstream.abort()
            return
        if not self._connections.start(self._connection(accepted, downstream)):  # shutting down, or not started
            self._expire_now(accepted)
            downstream.abort()

    async def _connection(self, accepted: _Accepted, downstream: SocketStream) -> None:
        self.open_connections += 1
        self.connections_served += 1
        try:
            with trace.use_span(accepted.span, end_on_exit=True):
                await self._carry(downstream, accepted)
        except Exception:  # one broken connection must never take the others (their TaskGroup) down
            log.exception("connection failed")
        finally:
            self.open_connections -= 1

    async def _carry(self, downstream: SocketStream, accepted: _Accepted) -> None:
        # The handshake just ended: the first request's head has until the deadline from now.
        client = FirstRequestHead(downstream, self.request_head_timeout)
        call = accepted.call
        if call is None:
            try:
                call = self._dial(await self.target.current_token(), accepted.traceparent)
            except LoginError as exc:
                refused = Refused(grpc.StatusCode.UNAUTHENTICATED, f"clusterconnect proxy: {exc}")
                await self._refuse(downstream, refused)
                await downstream.close()
                return
        try:
            # (The request could go out before the relay says "open", but a write racing the relay's
            # refusal turns grpc's status into INTERNAL and the user would not learn why.)
            timeout = DIAL_TIMEOUT_CONNECTED if accepted.connected else DIAL_TIMEOUT
            failure = await wait_open(call, timeout, self.target.relay)
            if failure is not None and failure.transport_failure:
                # The relay (a replica that is stopping, its connection just closed) never took this
                # Dial up; nothing of kubectl's went out, so a second Dial on the channel, which is
                # reconnecting (through a balancer: to another replica), is safe. Once only.
                log.info("dial retried", reason=failure.message)
                call.cancel()
                try:
                    call = self._dial(await self.target.current_token(), accepted.traceparent)
                except LoginError as exc:
                    await self._refuse(downstream, Refused(grpc.StatusCode.UNAUTHENTICATED,
                                                           f"clusterconnect proxy: {exc}"))
                    return
                failure = await wait_open(call, DIAL_TIMEOUT, self.target.relay)
            if failure is not None:
                await self._refuse(downstream, failure)
                return
            upstream = GrpcClientStream(call)
            await splice(client, upstream)
            await upstream.finish()
        except RequestHeadTimeout as exc:
            log.info("connection dropped", reason=str(exc))
            if client.received:  # a request begun and stalled: say why (an unused connection gets nothing)
                with contextlib.suppress(PeerGone):
                    await downstream.send(request_timeout_response(str(exc)))
        except PeerGone as exc:
            log.debug("connection ended abnormally", reason=str(exc))
        except Exception:  # one broken connection must never take the proxy down
            log.exception("connection failed")
        finally:
            call.cancel()
            await downstream.close()

    @staticmethod
    async def _refuse(downstream: SocketStream, refused: Refused) -> None:
        head = b""
        try:  # the request line only decides how the error is shaped (see dial_refusals.py)
            async with asyncio.timeout(0.2):
                head = await downstream.receive()
        except (TimeoutError, PeerGone):
            pass
        await refuse(downstream, refused, head)
