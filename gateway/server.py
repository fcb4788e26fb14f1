"""The gateway's data path: each TLS connection becomes one ClientTunnel.Dial, as the caller of its first request.

Per connection: the cluster from the SNI (gateway/sni.py), the caller's token from the first request's
head (gateway/first_request.py), a Dial to the relay with both, exactly as the client proxy Dials
(so the relay's access list applies before anything reaches the cluster), then the connection's bytes,
the first head included and unchanged, spliced through it. The gateway keeps no state between
connections: several run side by side behind a TCP balancer.
"""

from __future__ import annotations

import contextlib
from typing import Any

import grpc
from opentelemetry import trace

from clusterconnect import metadata as md
from clusterconnect.dial_refusals import DIAL_TIMEOUT, DIAL_TIMEOUT_CONNECTED, Refused, refuse, wait_open
from clusterconnect.errors import ClusterConnectError
from clusterconnect.gateway.first_request import HeadTimeout, MissingToken, read_first_request
from clusterconnect.gateway.sni import cluster_of, server_name_of
from clusterconnect.grpc_options import bearer
from clusterconnect.logs import get_logger
from clusterconnect.socket_stream import SocketStream
from clusterconnect.streams import GrpcClientStream, PeerGone, splice
from clusterconnect.tasks import ConnectionTasks
from clusterconnect.tracing import start_connection_span
from clusterconnect.v1 import tunnel_pb2_grpc

log = get_logger(__name__)

Call = grpc.aio.StreamStreamCall[Any, Any]

# A client that has not finished its TLS handshake by then is dropped.
HANDSHAKE_TIMEOUT = 10.0
# From the end of the handshake to the end of the first request's head (slowloris: each connection
# holds a Dial through relay, agent and auth proxy). kubectl writes its head at once.
REQUEST_HEAD_TIMEOUT = 10.0


class Gateway:
    """Serves ``loop.create_server(gateway.protocol, ssl=server_context(...), ssl_handshake_timeout=...)``."""

    def __init__(self, channel: grpc.aio.Channel, relay: str, domain: str,
                 request_head_timeout: float = REQUEST_HEAD_TIMEOUT) -> None:
        self.channel = channel
        self.stub = tunnel_pb2_grpc.ClientTunnelStub(channel)
        self.relay = relay  # as the operator wrote it, for messages
        self.domain = domain
        self.request_head_timeout = request_head_timeout
        self.open_connections = 0
        self._connections = ConnectionTasks()

    def serving(self) -> contextlib.AbstractAsyncContextManager[None]:
        """While this runs, accepted connections are served; when it ends they are cancelled and awaited."""
        return self._connections.serving()

    def protocol(self) -> SocketStream:
        return SocketStream(on_connected=self._start)

    def _start(self, downstream: SocketStream) -> None:
        if not self._connections.start(self._connection(downstream)):  # shutting down
            downstream.abort()

    async def _connection(self, downstream: SocketStream) -> None:
        self.open_connections += 1
        try:
            await self._serve(downstream)
        except Exception:  # one broken connection must never take the others (their TaskGroup) down
            log.exception("connection failed")
        finally:
            self.open_connections -= 1
            await downstream.close()

    async def _serve(self, downstream: SocketStream) -> None:
        assert downstream.transport is not None
        server_name = server_name_of(downstream.transport.get_extra_info("ssl_object"))
        try:
            first = await read_first_request(downstream, self.request_head_timeout)
        except HeadTimeout as exc:
            log.info("connection dropped", reason=str(exc))
            return
        except PeerGone as exc:  # reset before its first request
            log.debug("connection ended abnormally", reason=str(exc))
            return
        except ClusterConnectError as exc:  # BadRequest
            await refuse(downstream, Refused(exc.grpc_status, f"clusterconnect gateway: {exc}"), b"")
            return
        if first is None:  # opened and closed unused
            return
        head = first.raw
        try:
            cluster = cluster_of(server_name, self.domain)
            if first.token is None:
                raise MissingToken("the request carries no bearer token (Authorization: Bearer TOKEN): the"
                                   " gateway Dials the cluster as the caller whose token it is")
        except ClusterConnectError as exc:  # UnknownCluster (404), MissingToken (401)
            await refuse(downstream, Refused(exc.grpc_status, f"clusterconnect gateway: {exc}"), head)
            return
        span, traceparent = start_connection_span("gateway.connection", cluster=cluster)
        with trace.use_span(span, end_on_exit=True):
            await self._carry(downstream, cluster, first.token, traceparent, head)

    async def _carry(self, downstream: SocketStream, cluster: str, token: str, traceparent: str,
                     head: bytes) -> None:
        # Not connected to the relay (yet, or any more): an unreachable relay must become an error quickly.
        connected = self.channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY
        metadata = ((md.CLUSTER, cluster), bearer(token), (md.TRACEPARENT, traceparent))
        call: Call = self.stub.Dial(metadata=metadata)
        try:
            failure = await wait_open(call, DIAL_TIMEOUT_CONNECTED if connected else DIAL_TIMEOUT, self.relay)
            if failure is not None and failure.transport_failure:
                # As the client proxy: a relay replica going away never took this Dial up and nothing
                # was sent, so one more Dial (the channel reconnects, through a balancer elsewhere) is safe.
                log.info("dial retried", reason=failure.message)
                call.cancel()
                call = self.stub.Dial(metadata=metadata)
                failure = await wait_open(call, DIAL_TIMEOUT, self.relay)
            if failure is not None:
                await refuse(downstream, failure, head)
                return
            upstream = GrpcClientStream(call)
            await upstream.send(head)  # the first head, as it came
            await splice(downstream, upstream)
            await upstream.finish()
        except PeerGone as exc:
            log.debug("connection ended abnormally", reason=str(exc))
        finally:
            call.cancel()
