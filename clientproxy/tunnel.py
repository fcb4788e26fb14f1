"""The client proxy's data path: each TLS connection from kubectl becomes one ClientTunnel.Dial stream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from clusterconnect import metadata as md
from clusterconnect.clientproxy.errors import describe_rpc_error, error_response, is_discovery_request
from clusterconnect.clientproxy.tokens import LoginError
from clusterconnect.grpc_options import bearer
from clusterconnect.logs import get_logger
from clusterconnect.tracing import connection_span
from clusterconnect.streams import GrpcClientStream, PeerGone, SocketStream, splice
from clusterconnect.v1 import tunnel_pb2_grpc

log = get_logger(__name__)

# How long a Dial may take to open. With the relay connected, the relay itself answers within its
# Accept timeout (a burst of new connections may keep the agent busy for a while); without a
# connection to the relay, a relay that does not answer must become an error quickly.
DIAL_TIMEOUT_CONNECTED = 6.0
DIAL_TIMEOUT = 1.8
# After an error response, how long kubectl may take to read it and hang up.
LINGER = 1.0


@dataclass
class TunnelTarget:
    relay: str  # as the user wrote it, for messages
    cluster: str
    token: str
    # The user's login (clientproxy.tokens.CachedTokenSource.get): a fresh token for each Dial.
    tokens: Callable[[], Awaitable[str]] | None = None

    async def current_token(self) -> str:
        return await self.tokens() if self.tokens is not None else self.token


class ConnectionHandler:
    def __init__(self, channel: grpc.aio.Channel, target: TunnelTarget) -> None:
        self.channel = channel
        self.stub = tunnel_pb2_grpc.ClientTunnelStub(channel)
        self.target = target
        self.open_connections = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        downstream = SocketStream(reader, writer)
        with connection_span("clientproxy.connection", cluster=self.target.cluster) as traceparent:
            await self._carry(downstream, traceparent)

    async def _carry(self, downstream: SocketStream, traceparent: str) -> None:
        try:
            token = await self.target.current_token()
        except LoginError as exc:
            await self._refuse(downstream, grpc.StatusCode.UNAUTHENTICATED, f"clusterconnect proxy: {exc}")
            await downstream.close()
            self.open_connections -= 1
            return
        metadata = ((md.CLUSTER, self.target.cluster), bearer(token), (md.TRACEPARENT, traceparent))
        call = self.stub.Dial(metadata=metadata)
        try:
            failure = await self._opened(call)
            if failure is not None:
                await self._refuse(downstream, *failure)
                return
            upstream = GrpcClientStream(call)
            await splice(downstream, upstream)
            await upstream.finish()
        except PeerGone as exc:
            log.debug("connection ended abnormally", reason=str(exc))
        except Exception:  # one broken connection must never take the proxy down
            log.exception("connection failed")
        finally:
            call.cancel()
            await downstream.close()
            self.open_connections -= 1

    async def _opened(self, call: grpc.aio.StreamStreamCall) -> tuple[grpc.StatusCode | None, str] | None:
        """None once the relay says the path is open, else (code, one-line reason)."""
        connected = self.channel.get_state() == grpc.ChannelConnectivity.READY
        timeout = DIAL_TIMEOUT_CONNECTED if connected else DIAL_TIMEOUT
        try:
            initial = await asyncio.wait_for(call.initial_metadata(), timeout)
        except TimeoutError:
            return (grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"relay {self.target.relay} did not answer within {timeout:g}s")
        if any(key == md.OPEN for key, _ in initial or ()):
            return None
        code = await call.code()
        return code, describe_rpc_error(code, await call.details() or "", self.target.relay)

    @staticmethod
    async def _refuse(downstream: SocketStream, code: grpc.StatusCode | None, message: str) -> None:
        log.info("connection refused", reason=message)
        try:
            head = b""
            try:  # the request line only decides how the error is shaped (see errors.py)
                async with asyncio.timeout(0.2):
                    head = await downstream.receive()
            except TimeoutError:
                pass
            await downstream.send(error_response(code, message, plain=is_discovery_request(head)))
            # Let kubectl read the answer and hang up first, so it sees the response, not a reset.
            async with asyncio.timeout(LINGER):
                while await downstream.receive():
                    pass
        except (PeerGone, TimeoutError):
            pass
