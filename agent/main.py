"""clusterconnect-agent: runs in the cluster and opens only outbound connections, to the relay."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

import grpc

from clusterconnect import cliargs, service
from clusterconnect.agent.session import Agent, AgentConfig
from clusterconnect.grpc_options import CHANNEL_OPTIONS, grpc_target
from clusterconnect.logs import configure_logging
from clusterconnect.tracing import configure_tracing
from clusterconnect.service import StartupError
from clusterconnect.v1 import tunnel_pb2_grpc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clusterconnect-agent", description=__doc__)
    cliargs.add_version(parser)
    cliargs.add_flag(parser, "--relay", required=True, help="relay URL, e.g. https://relay.example.com:8443")
    cliargs.add_flag(parser, "--cluster", required=True, help="this cluster's name at the relay")
    cliargs.add_flag(parser, "--credential", required=True, type=Path, help="file holding the agent credential")
    cliargs.add_flag(parser, "--relay-ca", type=Path, help="CA bundle to verify the relay (default: system roots)")
    cliargs.add_flag(parser, "--authproxy", default="127.0.0.1:8080", help="HOST:PORT of the auth proxy")
    cliargs.add_flag(parser, "--authproxy-ca", type=Path,
                     help="CA bundle to verify the auth proxy's TLS; without it only a loopback auth proxy is allowed")
    cliargs.add_flag(parser, "--health-file", type=Path,
                     help="file touched on every heartbeat while connected (for a readiness probe)")
    cliargs.add_flag(parser, "--log-level", default="info", help="debug, info, warning or error")
    return parser.parse_args(argv)


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read {what} {path}: {exc.strerror}") from None


def authproxy_channel(address: str, ca: Path | None) -> grpc.aio.Channel:
    if ca is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=_read(ca, "auth proxy CA"))
        return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
    if not _is_loopback(address):
        raise StartupError(
            f"auth proxy {address} is not on loopback: give --authproxy-ca to reach it over TLS"
        )
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


async def run(args: argparse.Namespace) -> None:
    credential = _read(args.credential, "credential file").decode().strip()
    if not credential:
        raise StartupError(f"credential file {args.credential} is empty")
    relay_ca = _read(args.relay_ca, "relay CA") if args.relay_ca else None
    try:
        target = grpc_target(args.relay)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    async with authproxy_channel(args.authproxy, args.authproxy_ca) as channel:
        agent = Agent(
            AgentConfig(
                target, args.cluster, credential, relay_ca, tunnel_pb2_grpc.AuthProxyStub(channel),
                health_file=args.health_file,
            )
        )
        service.register_gauge("open_connections", lambda: agent.open_connections)
        await agent.run_forever()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging("agent", args.log_level)
    configure_tracing("agent")
    service.run(lambda: run(args))


if __name__ == "__main__":
    main(sys.argv[1:])
