"""clusterconnect-gateway: serve every cluster of a relay at https://CLUSTER.<cluster-domain>:PORT for kubectl.

A kubeconfig alone then reaches a cluster (`clusterconnect kubeconfig NAME --gateway URL`): no local
proxy. TLS ends here (a wildcard certificate); each connection is Dialled through the relay as the
caller whose bearer token its first request carries.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from pathlib import Path

import grpc

from clusterconnect import cliargs, service
from clusterconnect.errors import InvalidInput, StartupError
from clusterconnect.gateway.server import HANDSHAKE_TIMEOUT, REQUEST_HEAD_TIMEOUT, Gateway
from clusterconnect.gateway.sni import cluster_domain, server_context
from clusterconnect.grpc_options import CHANNEL_OPTIONS, grpc_target
from clusterconnect.logs import get_logger

log = get_logger(__name__)

# 8443-8446 are the relay's (users, agents, issuer, peers).
DEFAULT_LISTEN = "0.0.0.0:8447"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clusterconnect-gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cliargs.add_version(parser)
    cliargs.add_flag(parser, "--listen", default=DEFAULT_LISTEN, help="HOST:PORT to serve HTTPS on")
    cliargs.add_flag(parser, "--relay", required=True, help="relay URL, e.g. https://relay.example.com:8443")
    cliargs.add_flag(parser, "--relay-ca", type=Path, help="CA bundle that signed the relay's certificate")
    cliargs.add_flag(parser, "--cluster-domain", required=True,
                     help="clusters are served as CLUSTER.<this domain> (SNI), e.g. clusters.example.com")
    cliargs.add_flag(parser, "--tls-cert", type=Path, required=True,
                     help="serving certificate for *.<cluster-domain> (PEM, chain first)")
    cliargs.add_flag(parser, "--tls-key", type=Path, required=True, help="key of --tls-cert (PEM)")
    cliargs.add_flag(parser, "--request-head-timeout", type=float, default=REQUEST_HEAD_TIMEOUT,
                     help="seconds a client has after its TLS handshake to send its first request's head")
    cliargs.add_flag(parser, "--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def _listen_address(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidInput(f"--listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


async def serve(args: argparse.Namespace) -> None:
    host, port = _listen_address(args.listen)
    domain = cluster_domain(args.cluster_domain)
    tls = server_context(args.tls_cert, args.tls_key)
    try:
        relay_ca = args.relay_ca.read_bytes() if args.relay_ca else None
    except OSError as exc:
        raise StartupError(f"cannot read --relay-ca {args.relay_ca}: {exc.strerror}") from None
    credentials = grpc.ssl_channel_credentials(root_certificates=relay_ca)
    async with grpc.aio.secure_channel(grpc_target(args.relay), credentials, options=CHANNEL_OPTIONS) as channel:
        channel.get_state(try_to_connect=True)  # connect now, not at the first client's Dial
        gateway = Gateway(channel, args.relay, domain, args.request_head_timeout)
        try:
            server = await asyncio.get_running_loop().create_server(
                gateway.protocol, host, port, ssl=tls, backlog=1024, ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        except OSError as exc:
            raise StartupError(f"cannot listen on {args.listen}: {exc.strerror}") from None
        service.register_gauge("open_connections", lambda: gateway.open_connections)
        bound = server.sockets[0].getsockname()[1]
        # Leaving: the gateway cancels its connections first, then the server closes.
        async with server, gateway.serving():
            log.info("serving", address=f"{host}:{bound}", cluster_domain=domain, relay=args.relay)
            await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not (0 < args.request_head_timeout < math.inf):  # also refuses nan
        print(f"error: --request-head-timeout must be a positive number of seconds: {args.request_head_timeout}",
              file=sys.stderr)
        raise SystemExit(2)
    service.run_service("gateway", args.log_level, lambda: serve(args))


if __name__ == "__main__":
    main(sys.argv[1:])
