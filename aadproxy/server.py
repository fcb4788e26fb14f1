"""The AuthProxy gRPC service: one Serve stream per downstream connection, and Info."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import structlog

from clusterconnect import __version__
from clusterconnect import metadata as md
from clusterconnect.aadproxy.apiserver import ApiServer
from clusterconnect.aadproxy.audit import AuditLog, ConnectionAudit, ConnectionFacts, peer_ip
from clusterconnect.aadproxy.authn import ConnectionAuthenticator
from clusterconnect.aadproxy.http_forwarder import HEAD_TIMEOUT, forward_connection
from clusterconnect.aadproxy.kubeapi import fetch_version
from clusterconnect.aadproxy.upstream import ConnectUpstream
from clusterconnect.grpc_options import metadata_value
from clusterconnect.logs import get_logger
from clusterconnect.streams import GrpcServerStream
from clusterconnect.tracing import connection_span
from clusterconnect.v1 import tunnel_pb2, tunnel_pb2_grpc

log = get_logger(__name__)

VERSION_TTL = 60.0  # seconds a known apiserver version is reused
VERSION_RETRY = 5.0  # seconds before asking again after a failure
VERSION_TIMEOUT = 10.0


class AuthProxyService(tunnel_pb2_grpc.AuthProxyServicer):
    def __init__(self, apiserver: ApiServer, authenticator: ConnectionAuthenticator, cluster: str = "",
                 connect_upstream: ConnectUpstream | None = None, head_timeout: float = HEAD_TIMEOUT,
                 audit_log: AuditLog | None = None) -> None:
        self.apiserver = apiserver
        self.audit_log = audit_log
        self.head_timeout = head_timeout
        # Where forwarded connections come from (main.py passes the warm pool); default: a new one each.
        self.connect_upstream: ConnectUpstream = connect_upstream or apiserver.connect
        self.authenticator = authenticator
        self.cluster = cluster
        self._version = ""
        self._version_until = 0.0
        self._version_lock = asyncio.Lock()
        # Set once the server is stopping: a Serve cancelled then was not ended by its client.
        self.stopping = False

    async def Serve(
        self, request_iterator: AsyncIterator[tunnel_pb2.Chunk],
        context: grpc.aio.ServicerContext[tunnel_pb2.Chunk, tunnel_pb2.Chunk],
    ) -> None:
        # Every log event of this connection (the per-request ones included) names the cluster and
        # the trace; the authenticator adds the caller's identity per request. Each RPC runs in its
        # own task, so these bindings stay with this connection.
        metadata = context.invocation_metadata()
        # The agent's first message binds the stream to its caller (a warm stream sends it once the
        # relay gave the pair to a client). A stream without it is refused: no caller, no requests.
        first: object = await context.read()  # a Chunk, or grpc.aio.EOF
        if not isinstance(first, tunnel_pb2.Chunk):
            return  # ended before it was used (a warm stream the agent let go)
        if not first.HasField("bound") or not first.bound.HasField("caller"):
            log.warning("connection refused: the agent sent no connection identity (agent or relay too old?)",
                        cluster=self.cluster or None)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "the first message must be Chunk{bound} with the connection's caller")
        traceparent = first.bound.traceparent or metadata_value(metadata, md.TRACEPARENT)
        caller = first.bound.caller
        trace = trace_id(traceparent)
        structlog.contextvars.bind_contextvars(cluster=self.cluster or None, trace_id=trace)
        audit = None
        if self.audit_log is not None:
            # The peer is the agent: the client's own address stays at the relay (docs/audit.md).
            source = peer_ip(context.peer())
            audit = ConnectionAudit(self.audit_log, ConnectionFacts(self.cluster, trace, (source,) if source else ()))
        verified = (caller.issuer, caller.subject, caller.uid) if caller.issuer else None
        authenticator = self.authenticator.bound_to(verified)
        # The last hop's span, the agent's child; each request on the connection gets one below it.
        named = {"cluster": self.cluster} if self.cluster else {}  # (--cluster is optional here)
        with connection_span("aadproxy.connection", traceparent or None, **named):
            # Cancelling the RPC cancels this handler; forward_connection then drops the upstream socket.
            await forward_connection(GrpcServerStream(context), self.connect_upstream, authenticator,
                                     stopping=self._stopping, head_timeout=self.head_timeout, audit=audit)

    def _stopping(self) -> bool:
        return self.stopping

    async def Info(
        self, request: tunnel_pb2.InfoRequest,
        context: grpc.aio.ServicerContext[tunnel_pb2.InfoRequest, tunnel_pb2.InfoResponse],
    ) -> tunnel_pb2.InfoResponse:
        return tunnel_pb2.InfoResponse(
            kubernetes_version=await self.kubernetes_version(), auth_proxy_version=__version__
        )

    async def kubernetes_version(self) -> str:
        """The apiserver's gitVersion, cached briefly; "" while unknown."""
        async with self._version_lock:
            now = time.monotonic()
            if now < self._version_until:
                return self._version
            try:
                self._version = await asyncio.wait_for(fetch_version(self.apiserver), VERSION_TIMEOUT)
                self._version_until = now + VERSION_TTL
            except Exception as exc:
                log.warning("apiserver version unknown", error=" ".join(str(exc).split())[:300] or type(exc).__name__)
                self._version_until = now + VERSION_RETRY
            return self._version


def trace_id(traceparent: str | None) -> str | None:
    """The W3C trace id of a ``traceparent``, if well-formed."""
    parts = (traceparent or "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and all(c in "0123456789abcdef" for c in parts[1]):
        return parts[1]
    return None
