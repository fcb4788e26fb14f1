"""A relay replica's life in the fleet, for serve(): with ``--store etcd`` it holds an etcd lease,
registers itself, claims the routes of its agents, serves RelayPeer.Forward on the peer port and
forwards Dials for agents held elsewhere; SIGTERM (or a lost lease) drains it. With ``--store sqlite``
it is the one relay: it only ends its agents' sessions in order when it stops.

serve() calls ``add_flags`` and ``run_until_stopped`` (where it would wait for its server's termination);
everything else is here, so that main.py keeps no replica logic.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc

from clusterconnect import __version__, cliargs, health, service
from clusterconnect.errors import StartupError, Unavailable
from clusterconnect.grpc_options import SERVER_OPTIONS
from clusterconnect.logs import get_logger
from clusterconnect.relay.datapath.passthrough import raw_stream_handler
from clusterconnect.relay.datapath.sessions import EndReason
from clusterconnect.relay.datapath.tunnel import Tunnel
from clusterconnect.relay.routing.forwarding import PeerRouter
from clusterconnect.relay.routing.peer import SERVICE, PeerDialer, PeerTLS
from clusterconnect.relay.routing.routes import ReplicaState, Routing
from clusterconnect.relay.storage import backend
from clusterconnect.relay.storage.etcd.client import Etcd, EtcdUnavailable, LeaseLost
from clusterconnect.relay.storage.etcd.lease_keeper import keep_alive

log = get_logger(__name__)

DEFAULT_PEER_LISTEN = "0.0.0.0:8446"
# How long the Connect handlers get to return once their sessions were ended (they return at once
# unless the event loop is swamped).
SESSIONS_END_TIMEOUT = 2.0


def add_flags(parser: argparse.ArgumentParser) -> None:
    # --store and the etcd flags are defined once (storage/backend.py); serve() may add them itself.
    if "--store" not in parser._option_string_actions:
        backend.add_flags(parser)
    cliargs.add_flag(parser, "--replica-name", default=f"{socket.gethostname()}-{os.getpid()}",
                     help="with --store etcd: this replica's name in etcd (default HOSTNAME-PID; unique)")
    cliargs.add_flag(parser, "--peer-listen", default=DEFAULT_PEER_LISTEN,
                     help="with --store etcd: HOST:PORT for RelayPeer.Forward from the other replicas (mutual TLS)")
    cliargs.add_flag(parser, "--peer-advertise", default="",
                     help="HOST:PORT the other replicas dial to reach this one (default: --peer-listen's host,"
                          " or this machine's hostname if that is 0.0.0.0, and the port it listens on)")
    cliargs.add_flag(parser, "--peer-ca", type=Path, help="relay-peer CA: the only certificates the peer port accepts")
    cliargs.add_flag(parser, "--peer-cert", type=Path,
                     help="this replica's certificate of the relay-peer CA (server and client auth)")
    cliargs.add_flag(parser, "--peer-key", type=Path, help="key of --peer-cert")
    cliargs.add_flag(parser, "--peer-server-name", default="",
                     help="the name every replica's peer certificate carries, checked instead of the peer's address"
                          " (for replicas that share one certificate, e.g. pods whose IPs are not known in advance;"
                          " the relay-peer CA signs only replicas' certificates)")
    cliargs.add_flag(parser, "--lease-ttl-seconds", type=int, default=10,
                     help="TTL of the replica's etcd lease: a replica that dies loses its routes this long after")
    cliargs.add_flag(parser, "--drain-seconds", type=float, default=5.0,
                     help="on SIGTERM, Drain is sent to the agents spread over this long")
    cliargs.add_flag(parser, "--shutdown-grace-seconds", type=float, default=25.0,
                     help="on SIGTERM, how long open connections may go on before the relay exits")


class LeaseGone(Unavailable):
    """The replica lost its etcd lease: it drained and stopped (its routes are no longer its own)."""


def _peer_tls(args: argparse.Namespace) -> PeerTLS:
    files = {"--peer-ca": args.peer_ca, "--peer-cert": args.peer_cert, "--peer-key": args.peer_key}
    missing = [flag for flag, path in files.items() if path is None]
    if missing:
        raise StartupError(f"--store etcd needs {', '.join(missing)} (the relay-peer CA and this replica's"
                           " certificate)")
    try:
        return PeerTLS(ca=args.peer_ca.read_bytes(), cert=args.peer_cert.read_bytes(), key=args.peer_key.read_bytes())
    except OSError as exc:
        raise StartupError(f"cannot read a relay-peer TLS file: {exc}") from None


def _advertised(args: argparse.Namespace, port: int) -> str:
    if args.peer_advertise:
        return str(args.peer_advertise)
    host = args.peer_listen.rsplit(":", 1)[0].strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _end_sessions(tunnel: Tunnel) -> None:
    """End every agent session and let the Connect handlers return before the server stops."""
    tunnel.end_sessions(EndReason.RELAY_STOPPING)
    await tunnel.wait_quiet(lambda: len(tunnel.sessions) == 0, SESSIONS_END_TIMEOUT)


async def run_until_stopped(args: argparse.Namespace, tunnel: Tunnel, server: grpc.aio.Server) -> None:
    """Serve until cancelled (SIGTERM, SIGINT), then end the agents' sessions in order; with --store etcd,
    as a replica of the fleet (``Replica``), which stops ``server`` once drained (the caller stops it
    otherwise).

    Never ``await server.wait_for_termination()`` here: cancelling a task that awaits it cancels the
    server's own shutdown future, and the caller's ``server.stop(grace)`` then raises CancelledError at
    once instead of waiting out the grace."""
    if getattr(args, "store", backend.SQLITE) != backend.ETCD:
        try:
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            _uncancel()
            await _end_sessions(tunnel)
        return
    if args.lease_ttl_seconds < 2 or args.drain_seconds < 0 or args.shutdown_grace_seconds < 0:
        raise StartupError("--lease-ttl-seconds must be 2 or more, --drain-seconds and --shutdown-grace-seconds"
                           " 0 or more")
    tls = _peer_tls(args)
    etcd = backend.etcd_client(args)
    try:
        await Replica(args, tunnel, etcd, tls, server).run()
    finally:
        await etcd.close()


# After a drain, how long the calls still open may go on once the server stops (as serve() gives them).
LAST_CALLS_GRACE = 2.0


def _uncancel() -> bool:
    """Take back this task's pending cancellation (SIGTERM's) so that the shutdown that follows can await;
    True if there was one (the caller raises CancelledError again once done)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0 and task.uncancel() >= 0


@dataclass
class Replica:
    args: argparse.Namespace
    tunnel: Tunnel
    etcd: Etcd
    tls: PeerTLS
    server: grpc.aio.Server  # the user and agent ports

    @property
    def name(self) -> str:
        return str(self.args.replica_name)

    async def run(self) -> None:
        ttl = self.args.lease_ttl_seconds
        try:
            lease = await self.etcd.grant(ttl)
        except EtcdUnavailable as exc:
            raise StartupError(f"cannot get a lease from etcd: {exc}") from None
        routing = Routing(self.etcd, self.name, lease)
        peer_server = grpc.aio.server(options=SERVER_OPTIONS)
        peer_server.add_generic_rpc_handlers((raw_stream_handler(SERVICE, {"Forward": self.tunnel.Forward}),))
        health.add_to_server(peer_server)
        try:
            port = peer_server.add_secure_port(self.args.peer_listen, self.tls.server_credentials())
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {self.args.peer_listen} (--peer-listen): {exc}") from None
        if port == 0:
            raise StartupError(f"cannot listen on {self.args.peer_listen} (--peer-listen): address in use")
        dialer = PeerDialer(self.tls, self.args.peer_server_name or None)
        advertise = _advertised(self.args, port)
        service.register_gauge("routes", routing.routes.count)
        service.register_gauge("route_txns", lambda: routing.txns)
        await peer_server.start()
        stopped = lost = False
        try:
            async with asyncio.TaskGroup() as group:
                # Owned here and cancelled once drained: the watches, the lease, the server's end.
                background: list[asyncio.Task[object]] = [group.create_task(routing.run())]
                try:
                    try:
                        await routing.register(advertise, __version__)
                    except EtcdUnavailable as exc:
                        raise StartupError(f"cannot register relay replica {self.name} in etcd: {exc}") from None
                    self.tunnel.set_router(PeerRouter(routing, dialer))
                    log.info("replica registered", replica=self.name, peer=advertise, lease=format(lease, "x"),
                             ttl=ttl)
                    keep_alive = group.create_task(self._keep_alive(lease, ttl))
                    background.append(keep_alive)
                    # Until the lease is lost or SIGTERM cancels us (see run_until_stopped).
                    await asyncio.wait((keep_alive,))
                    lost = True
                    log.error("etcd lease lost; draining", replica=self.name, reason=str(keep_alive.result()))
                except asyncio.CancelledError:
                    stopped = _uncancel()
                    if not stopped:
                        raise
                await self._drain(routing, advertise, "lease lost" if lost else "relay replica stopping", lost)
                # Still a replica that forwards: stop taking Dials first. The server's GOAWAY sends client
                # proxies to reconnect (through the balancer: to another replica; one whose Dial raced it
                # retries it there). Dials that reached us until now were forwarded, not refused as
                # "not connected" by a relay that had already left the fleet.
                await self.server.stop(LAST_CALLS_GRACE)
                for task in background:
                    task.cancel()
        finally:
            self.tunnel.set_router(None)
            if not lost:
                try:  # the routes go at once, not a TTL later
                    async with asyncio.timeout(2):
                        await self.etcd.revoke(lease)
                except (EtcdUnavailable, TimeoutError) as exc:
                    log.warning("lease not revoked; its routes go when it runs out", reason=str(exc))
            await peer_server.stop(grace=1)
            await dialer.close()
        if lost:
            raise LeaseGone(f"relay replica {self.name} lost its etcd lease: drained and stopped")
        if stopped:
            raise asyncio.CancelledError

    async def _keep_alive(self, lease: int, ttl: int) -> LeaseLost:
        """The lease kept alive until it is lost (returned, not raised: losing it is an event to act on,
        not a failure of the TaskGroup)."""
        try:
            await keep_alive(self.etcd, lease, ttl)
        except LeaseLost as exc:
            return exc
        raise AssertionError("keep_alive returns only by raising")

    async def _drain(self, routing: Routing, advertise: str, reason: str, lost: bool) -> None:
        """Refuse new agent sessions, send Drain to the agents spread over --drain-seconds, let open
        connections go on until the grace deadline, then end what is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.args.shutdown_grace_seconds
        tunnel = self.tunnel
        tunnel.draining = f"relay replica {self.name} is draining: connect to another replica"
        if not lost:
            try:
                async with asyncio.timeout(2):
                    await routing.register(advertise, __version__, ReplicaState.DRAINING)
            except (EtcdUnavailable, TimeoutError) as exc:
                log.warning("draining not recorded in etcd", reason=str(exc))
        sessions = tunnel.sessions.all()
        log.info("draining", replica=self.name, agents=len(sessions), connections=tunnel.open_connections,
                 reason=reason)
        step = self.args.drain_seconds / len(sessions) if sessions else 0
        for i, session in enumerate(sessions):
            if i:
                await asyncio.sleep(step)  # pacing: the agents reconnect elsewhere a few at a time
            session.drain(reason)

        def idle() -> bool:
            return len(tunnel.sessions) == 0 and tunnel.open_connections == 0

        if not await tunnel.wait_quiet(idle, max(0.0, deadline - loop.time())):
            log.warning("grace period over; ending what is left", agents=len(tunnel.sessions),
                        connections=tunnel.open_connections)
        await _end_sessions(tunnel)
        log.info("drained", replica=self.name)
