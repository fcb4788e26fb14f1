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
from clusterconnect.grpc_options import CHANNEL_OPTIONS, bearer
from clusterconnect.logs import get_logger
from clusterconnect.streams import GrpcClientStream, PeerGone, splice
from clusterconnect.tasks import race, unwrap
from clusterconnect.tracing import connection_span
from clusterconnect.v1 import tunnel_pb2, tunnel_pb2_grpc

log = get_logger(__name__)

# A session that stayed up this long counts as healthy: the next failure starts backoff afresh.
HEALTHY_AFTER = 10.0


class _SessionOver(Exception):
    pass


@dataclass
class AgentConfig:
    relay_target: str
    cluster: str
    credential: str
    relay_ca: bytes | None
    authproxy: tunnel_pb2_grpc.AuthProxyStub
    # Touched while the control stream is healthy, for an exec readiness probe in Kubernetes.
    health_file: Path | None = None


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.open_connections = 0
        self.connected = asyncio.Event()

    def _metadata(self, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        return ((md.CLUSTER, self.config.cluster), bearer(self.config.credential), *extra)

    async def run_forever(self) -> None:
        backoff = Backoff()
        while True:
            started = time.monotonic()
            try:
                await self._session()
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

    async def _session(self) -> None:
        credentials = grpc.ssl_channel_credentials(root_certificates=self.config.relay_ca)
        async with grpc.aio.secure_channel(
            self.config.relay_target, credentials, options=CHANNEL_OPTIONS
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
                log.info("connected to relay", relay=self.config.relay_target, cluster=self.config.cluster)
                self.connected.set()
                self._touch_health()
                try:
                    async with asyncio.TaskGroup() as connections:
                        await race(
                            self._heartbeats(call, first.welcome.heartbeat_seconds or 10),
                            self._control(call, stub, connections),
                        )
                        # The control stream is gone; connections riding on this channel go with it.
                        raise _SessionOver
                except BaseExceptionGroup as failure:
                    error = unwrap(failure)
                    if not isinstance(error, _SessionOver):
                        raise error from None
            finally:
                call.cancel()

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
        """One user connection: relay Accept stream <-> auth proxy Serve stream."""
        with connection_span("agent.connection", dial.traceparent or None, cluster=self.config.cluster) as traceparent:
            await self._splice(stub, dial, traceparent)

    async def _splice(self, stub, dial: tunnel_pb2.DialRequest, traceparent: str) -> None:
        accept = stub.Accept(metadata=self._metadata((md.DIAL_ID, dial.dial_id)))
        serve = self.config.authproxy.Serve(metadata=((md.TRACEPARENT, traceparent),))
        self.open_connections += 1
        relay_side, cluster_side = GrpcClientStream(accept), GrpcClientStream(serve)
        try:
            await splice(relay_side, cluster_side)
            await cluster_side.finish()
            await relay_side.finish()
        except PeerGone as exc:
            log.debug("connection ended abnormally", dial_id=dial.dial_id, reason=str(exc))
        except Exception:  # one broken connection must never take the agent down
            log.exception("connection failed", dial_id=dial.dial_id)
        finally:
            self.open_connections -= 1
            accept.cancel()
            serve.cancel()
