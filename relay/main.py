"""clusterconnect-relay: the rendezvous point that agents and client proxies both dial out to."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from pathlib import Path

import grpc

from clusterconnect import cliargs, health, service
from clusterconnect.errors import ClusterConnectError, StartupError
from clusterconnect.grpc_options import RELAY_SERVER_OPTIONS
from clusterconnect.logs import get_logger
from clusterconnect.pki import create_ca, ensure_server_cert, write_private
from clusterconnect.relay import health as relay_health
from clusterconnect.relay.admin_api.registry import Registry
from clusterconnect.relay.agent_identity import enrollment as agent_enrollment
from clusterconnect.relay.datapath import metrics as relay_metrics
from clusterconnect.relay.datapath.connections import (
    DEFAULT_MAX_PER_CLUSTER,
    DEFAULT_MAX_PER_IDENTITY,
    ConnectionRegistry,
)
from clusterconnect.relay.datapath.passthrough import raw_stream_handler
from clusterconnect.relay.datapath.sessions import EndReason, SessionTable
from clusterconnect.relay.datapath.tunnel import Tunnel
from clusterconnect.relay.routing import wiring as routing
from clusterconnect.relay.storage import backend, shared
from clusterconnect.relay.storage import migrate as store_migration
from clusterconnect.relay.storage.clusters import PREFIX as CLUSTERS_PREFIX
from clusterconnect.relay.storage.clusters import ClusterStore
from clusterconnect.relay.storage.sealing import SealingKey
from clusterconnect.relay.storage.store import Store
from clusterconnect.relay.user_identity import wiring as user_identity
from clusterconnect.v1 import tunnel_pb2, tunnel_pb2_grpc

log = get_logger(__name__)

ADMIN_CREDENTIAL_FILE = "admin.credential"
ADMIN_CREDENTIAL_KEY = "admin/credential"
RELAY_CA_KEY = "pki/relay-ca"
# The first full listing of an etcd store takes milliseconds; longer means etcd is not answering.
STORE_READY_SECONDS = 30.0
# Loopback: metrics are for the operator, not the public the relay's other ports face (README "Default ports").
DEFAULT_METRICS_LISTEN = "127.0.0.1:9443"


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
    cliargs.add_flag(serve, "--metrics-listen", default=DEFAULT_METRICS_LISTEN,
                     help="HOST:PORT for /metrics, /healthz and /readyz (plain HTTP; \"\" for none)")
    cliargs.add_flag(serve, "--sealing-key-file", type=Path,
                     help="key that seals the private keys and credentials in the store (a file or mounted"
                          " Secret, mode 600 or 400; the same file at every replica). Default: DATA_DIR/sealing.key,"
                          " created on first start with --store sqlite; with --store etcd it must exist")
    backend.add_flags(serve)
    user_identity.add_flags(serve)
    agent_enrollment.add_flags(serve)
    store_migration.add_command(commands)
    routing.add_flags(serve)
    return parser.parse_args(argv)


def sealing_key(args: argparse.Namespace, data_dir: Path) -> SealingKey:
    """An explicit file (a mounted Secret) must exist: a new key would not open what the old one sealed.
    With etcd the default file must exist too: two replicas must not each make a key of their own."""
    create = args.sealing_key_file is None and args.store == backend.SQLITE
    path = args.sealing_key_file or data_dir / "sealing.key"
    if not create and not path.exists():
        raise StartupError(f"sealing key {path} does not exist" + (
            " (--store etcd: give every replica the same key file; make it once with `openssl rand -hex 32`)"
            if args.store == backend.ETCD else ""))
    return SealingKey.load_or_create(path, create=create)


async def admin_credential(store: Store, sealing: SealingKey, data_dir: Path) -> str:
    """The admin credential, made once in the store for every replica; DATA_DIR/admin.credential (600)
    is this replica's copy for the operator (an existing one is imported on the first start)."""
    path = data_dir / ADMIN_CREDENTIAL_FILE
    credential = await shared.secret(store, sealing, ADMIN_CREDENTIAL_KEY, path)
    if not path.exists() or path.read_text().strip() != credential:
        write_private(path, credential.encode())
        log.info("admin credential written", path=str(path))
    return credential


def _data_dir(args: argparse.Namespace) -> Path:
    data_dir: Path = args.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    return data_dir


async def _serving_certificate(args: argparse.Namespace, data_dir: Path, store: Store,
                               sealing: SealingKey) -> tuple[Path, Path]:
    """The operator's --tls-cert, or one this replica issues itself (its --hostname names) from the relay
    CA that every replica shares (made once in the store); the CA is written to DATA_DIR/pki/ca.crt."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise StartupError("--tls-cert and --tls-key go together")
    if args.tls_cert:
        return args.tls_cert, args.tls_key
    pki = data_dir / "pki"
    pki.mkdir(parents=True, exist_ok=True)
    ca = await shared.key_pair(store, sealing, RELAY_CA_KEY, (pki / "ca.crt", pki / "ca.key"),
                               lambda: create_ca("clusterconnect relay CA"))
    if not (pki / "ca.crt").exists() or (pki / "ca.crt").read_bytes() != ca.cert_pem:
        (pki / "ca.crt").write_bytes(ca.cert_pem)
    hosts = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *(args.hostname or [])]
    return ensure_server_cert(pki, ca, hosts)


async def serve(args: argparse.Namespace) -> None:
    data_dir = _data_dir(args)
    if args.max_connections_per_cluster < 0 or args.max_connections_per_identity < 0:
        raise StartupError("--max-connections-per-cluster and --max-connections-per-identity must be 0 or more")
    sealing = sealing_key(args, data_dir)
    store = await Store.open(backend.open_kv(args, data_dir))
    try:
        # The store's watch (etcd) and the agents' last-seen writes beside the server: cancelled and awaited
        # however serving ends.
        async with asyncio.TaskGroup() as tasks:
            background = [tasks.create_task(store.run())]
            try:
                await store.ready(STORE_READY_SECONDS)
                await shared.check_sealing_key(store, sealing)  # before anything is written
                clusters = await ClusterStore.open(store)
                background.append(tasks.create_task(clusters.record_seen_forever()))
                await _serve(args, data_dir, store, sealing, clusters)
            finally:
                for task in background:
                    task.cancel()
    finally:
        await store.close()


async def _serve(args: argparse.Namespace, data_dir: Path, store: Store, sealing: SealingKey,
                 clusters: ClusterStore) -> None:
    cert_path, key_path = await _serving_certificate(args, data_dir, store, sealing)
    ca_file = data_dir / "pki" / "ca.crt"
    # The chain includes the relay CA: agents find the CA they pinned by hash in it (agent_identity/enrollment.py).
    chain_pem, relay_ca_pem = agent_enrollment.serving_chain(cert_path, None if args.tls_cert else ca_file)
    key_pem = key_path.read_bytes()
    credentials = grpc.ssl_server_credentials([(key_pem, chain_pem)])
    admin = await admin_credential(store, sealing, data_dir)

    sessions = SessionTable()

    def removed(key: str, value: bytes | None) -> None:
        # A cluster removed at any replica ends its agent's session here too (and with it, its connections).
        if value is None:
            sessions.end(key[len(CLUSTERS_PREFIX):], EndReason.CLUSTER_REMOVED)
    store.subscribe(CLUSTERS_PREFIX, removed)
    connections = ConnectionRegistry(args.max_connections_per_cluster, args.max_connections_per_identity)
    server = grpc.aio.server(options=RELAY_SERVER_OPTIONS)
    agents = await agent_enrollment.AgentEnrollment.start(args, store, sealing, data_dir, clusters, relay_ca_pem)
    agent_port = agents.add_to_server(server, key_pem, chain_pem)
    identity = await user_identity.start(
        args, data_dir, store, clusters, sealing, cert_path, key_path, None if args.tls_cert else ca_file.read_text(),
        admin, server, connections,
    )
    tunnel = Tunnel(clusters, sessions, args.heartbeat_seconds,
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
    registry = Registry(clusters, sessions, admin, agents, tunnel.holder)
    tunnel_pb2_grpc.add_RegistryServicer_to_server(registry, server)
    try:
        port = server.add_secure_port(args.listen, credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {args.listen}: {exc}") from None
    if port == 0:
        raise StartupError(f"cannot listen on {args.listen}: address in use or not available")
    relay_metrics.register(tunnel, sessions)
    relay_health.register(tunnel, store, server)
    if args.store == backend.ETCD:
        tunnel.expect_router()  # until routing.Replica registered this replica
    await server.start()
    health.serving()
    host = args.listen.rsplit(":", 1)[0]
    log.info("serving", address=f"{host}:{port}", agent_port=agent_port, data_dir=str(data_dir), store=args.store)
    try:
        await routing.run_until_stopped(args, tunnel, server)
    finally:
        await server.stop(grace=2)
        await identity.endpoint.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "migrate":
        try:
            copied = asyncio.run(store_migration.migrate(args))
        except ClusterConnectError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)
        print(f"copied {copied} records from {args.source} to {args.target}")
        return
    service.run_service("relay", args.log_level, lambda: serve(args), args.metrics_listen)


if __name__ == "__main__":
    main(sys.argv[1:])
