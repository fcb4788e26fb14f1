"""clusterconnect-relay: the rendezvous point that agents and client proxies both dial out to."""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
from pathlib import Path

import grpc

from clusterconnect import cliargs, service
from clusterconnect.errors import StartupError
from clusterconnect.grpc_options import RELAY_SERVER_OPTIONS
from clusterconnect.logs import get_logger
from clusterconnect.pki import ensure_ca_and_server_cert, write_private
from clusterconnect.relay.admin_api.registry import Registry
from clusterconnect.relay.agent_identity import enrollment as agent_enrollment
from clusterconnect.relay.datapath.connections import (
    DEFAULT_MAX_PER_CLUSTER,
    DEFAULT_MAX_PER_IDENTITY,
    ConnectionRegistry,
)
from clusterconnect.relay.datapath.passthrough import raw_stream_handler
from clusterconnect.relay.datapath.sessions import SessionTable
from clusterconnect.relay.datapath.tunnel import Tunnel
from clusterconnect.relay.routing import wiring as routing
from clusterconnect.relay.storage.clusters import ClusterStore
from clusterconnect.relay.user_identity import wiring as user_identity
from clusterconnect.v1 import tunnel_pb2, tunnel_pb2_grpc

log = get_logger(__name__)

ADMIN_CREDENTIAL_FILE = "admin.credential"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clusterconnect-relay", description=__doc__)
    cliargs.add_version(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the relay")
    cliargs.add_flag(serve, "--data-dir", required=True, type=Path,
                     help="state: SQLite registry, CA and serving certificate, admin credential")
    cliargs.add_flag(serve, "--listen", default="0.0.0.0:8443", help="HOST:PORT to serve gRPC/TLS on")
    cliargs.add_flag(serve, "--tls-cert", type=Path, help="serving certificate (default: made in DATA_DIR)")
    cliargs.add_flag(serve, "--tls-key", type=Path, help="key of --tls-cert")
    cliargs.add_flag(serve, "--hostname", action="append", default=None,
                     help="extra DNS name or IP for the generated serving certificate (repeatable)")
    cliargs.add_flag(serve, "--heartbeat-seconds", type=int, default=10,
                     help="how often agents send heartbeats; 3 missed ones end a session")
    cliargs.add_flag(serve, "--max-connections-per-cluster", type=int, default=DEFAULT_MAX_PER_CLUSTER,
                     help="open client connections one cluster may have at this relay (0: unlimited);"
                          " a Dial over it ends with RESOURCE_EXHAUSTED")
    cliargs.add_flag(serve, "--max-connections-per-identity", type=int, default=DEFAULT_MAX_PER_IDENTITY,
                     help="open client connections one verified caller (issuer + subject) may have at this"
                          " relay, over all clusters (0: unlimited)")
    cliargs.add_flag(serve, "--log-level", default="info", help="debug, info, warning or error")
    user_identity.add_flags(serve)
    agent_enrollment.add_flags(serve)
    routing.add_flags(serve)
    return parser.parse_args(argv)


def admin_credential(data_dir: Path) -> str:
    path = data_dir / ADMIN_CREDENTIAL_FILE
    if not path.exists():
        write_private(path, secrets.token_urlsafe(32).encode())
        log.info("admin credential created", path=str(path))
    return path.read_text().strip()


def _data_dir(args: argparse.Namespace) -> Path:
    data_dir: Path = args.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    return data_dir


def _serving_certificate(args: argparse.Namespace, data_dir: Path) -> tuple[Path, Path]:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise StartupError("--tls-cert and --tls-key go together")
    if args.tls_cert:
        return args.tls_cert, args.tls_key
    hosts = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *(args.hostname or [])]
    _, cert_path, key_path = ensure_ca_and_server_cert(data_dir / "pki", "clusterconnect relay CA", hosts)
    return cert_path, key_path


async def serve(args: argparse.Namespace) -> None:
    data_dir = _data_dir(args)
    cert_path, key_path = _serving_certificate(args, data_dir)
    ca_file = data_dir / "pki" / "ca.crt"
    # The chain includes the relay CA: agents find the CA they pinned by hash in it (agent_identity/enrollment.py).
    chain_pem, relay_ca_pem = agent_enrollment.serving_chain(cert_path, None if args.tls_cert else ca_file)
    key_pem = key_path.read_bytes()
    credentials = grpc.ssl_server_credentials([(key_pem, chain_pem)])
    admin = admin_credential(data_dir)

    if args.max_connections_per_cluster < 0 or args.max_connections_per_identity < 0:
        raise StartupError("--max-connections-per-cluster and --max-connections-per-identity must be 0 or more")
    store = ClusterStore(data_dir / "relay.db")
    sessions = SessionTable()
    connections = ConnectionRegistry(args.max_connections_per_cluster, args.max_connections_per_identity)
    server = grpc.aio.server(options=RELAY_SERVER_OPTIONS)
    agents = agent_enrollment.AgentEnrollment(args, data_dir, store, relay_ca_pem)
    agent_port = agents.add_to_server(server, key_pem, chain_pem)
    identity = await user_identity.start(
        args, data_dir, store, cert_path, key_path, None if args.tls_cert else ca_file.read_text(), admin, server,
        connections,
    )
    tunnel = Tunnel(store, sessions, args.heartbeat_seconds,
                    authorizer=identity.authorizer, agent_auth=agents.authenticator, connections=connections)
    server.add_generic_rpc_handlers((
        raw_stream_handler("clusterconnect.v1.ClientTunnel", {"Dial": tunnel.Dial}),
        # Connect carries control messages and is decoded as usual; Accept carries raw Chunks.
        grpc.method_handlers_generic_handler("clusterconnect.v1.AgentTunnel", {
            "Connect": grpc.stream_stream_rpc_method_handler(
                tunnel.Connect,
                request_deserializer=tunnel_pb2.AgentMessage.FromString,
                response_serializer=tunnel_pb2.RelayMessage.SerializeToString,
            ),
            "Accept": grpc.stream_stream_rpc_method_handler(tunnel.Accept),
        }),
    ))
    registry = Registry(store, sessions, admin, agents)
    tunnel_pb2_grpc.add_RegistryServicer_to_server(registry, server)
    try:
        port = server.add_secure_port(args.listen, credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {args.listen}: {exc}") from None
    if port == 0:
        raise StartupError(f"cannot listen on {args.listen}: address in use or not available")
    service.register_gauge("agents", lambda: len(sessions))
    service.register_gauge("open_connections", lambda: tunnel.open_connections)
    service.register_gauge("warm_streams", sessions.warm_streams)
    service.register_gauge("dials_warm", lambda: tunnel.dials_warm)
    service.register_gauge("dials_requested", lambda: tunnel.dials_requested)
    await server.start()
    host = args.listen.rsplit(":", 1)[0]
    log.info("serving", address=f"{host}:{port}", agent_port=agent_port, data_dir=str(data_dir))
    try:
        await routing.run_until_stopped(args, tunnel, server)
    finally:
        await server.stop(grace=2)
        await identity.endpoint.close()
        identity.close()
        agents.close()
        store.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    service.run_service("relay", args.log_level, lambda: serve(args))


if __name__ == "__main__":
    main(sys.argv[1:])
