"""clusterconnect-aadproxy: authenticate each HTTP request arriving through the tunnel, forward it."""

from __future__ import annotations

import argparse
import asyncio
import socket
from pathlib import Path

import grpc

from clusterconnect import health, metrics
from clusterconnect.aadproxy import apiserver as apiserver_mod
from clusterconnect.aadproxy import metrics as aadproxy_metrics
from clusterconnect.aadproxy.audit import AuditLog
from clusterconnect.aadproxy.authn import ConnectionAuthenticator, TokenPassthrough
from clusterconnect.aadproxy.http_forwarder import HEAD_TIMEOUT, open_connections
from clusterconnect.aadproxy.kubeapi import AccessReviewer, ApiError, serviceaccount_issuer
from clusterconnect.aadproxy.oidc_authn import LEGACY_SERVICEACCOUNT_ISSUER, OIDCAuthenticator
from clusterconnect.aadproxy.server import AuthProxyService
from clusterconnect.aadproxy.upstream import open_upstream_connections
from clusterconnect.aadproxy.upstream_pool import UpstreamPool
from clusterconnect.addresses import is_loopback
from clusterconnect.cliargs import add_flag, add_version
from clusterconnect.errors import StartupError
from clusterconnect.grpc_options import SERVER_OPTIONS
from clusterconnect.logs import get_logger
from clusterconnect.oidc import ConfigError, Verifier, load_config
from clusterconnect.service import run_service
from clusterconnect.v1 import tunnel_pb2_grpc

log = get_logger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8080"
# Loopback like --listen's default; the chart opens it on the pod network for its probes.
DEFAULT_METRICS_LISTEN = "127.0.0.1:9445"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clusterconnect-aadproxy",
        description="Auth proxy: serves AuthProxy (gRPC) for the agent and forwards authenticated "
        "HTTP requests to the kube-apiserver.",
    )
    # The agent's --authproxy default: on one machine the two meet without flags (loopback, so plaintext is allowed).
    add_flag(parser, "--listen", default=DEFAULT_LISTEN, help="host:port for the gRPC server")
    add_flag(parser, "--kubeconfig", help="apiserver and own identity from this file (default: in-cluster)")
    add_flag(parser, "--tls-cert", help="serve gRPC with TLS: certificate chain (PEM)")
    add_flag(parser, "--tls-key", help="serve gRPC with TLS: private key (PEM)")
    add_flag(parser, "--authentication-config",
             help="OIDC mode: AuthenticationConfiguration file (kube-apiserver format); callers with a token of "
             "a configured issuer are impersonated with the proxy's own ServiceAccount credential. Without it: "
             "token passthrough")
    parser.add_argument("--serviceaccount-issuer", action="append", default=None, metavar="URL",
                        help="OIDC mode: tokens with this iss are ServiceAccount tokens, passed through untouched "
                        "(repeatable; default: the cluster's issuer from the apiserver's discovery, plus "
                        f"{LEGACY_SERVICEACCOUNT_ISSUER!r})")
    add_flag(parser, "--request-head-timeout", type=float, default=HEAD_TIMEOUT,
             help="seconds from the first byte of a request head to its end; a slower client gets 408 and"
             " is disconnected")
    add_flag(parser, "--cluster", default="", help="cluster name recorded in each request's log event")
    add_flag(parser, "--audit-log", default="", metavar="FILE|-",
             help='write one audit.k8s.io/v1 Event (JSON line) per request to this file (appended, created 0600),'
             ' or "-" for standard output (default: none; docs/audit.md)')
    add_flag(parser, "--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_flag(parser, "--metrics-listen", default=DEFAULT_METRICS_LISTEN,
             help='HOST:PORT for /metrics, /healthz and /readyz (plain HTTP; "" for none; in a pod, 0.0.0.0:9445'
             " for the kubelet's probes)")
    add_version(parser)
    return parser.parse_args(argv)


def split_listen(addr: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise StartupError(f"--listen must be host:port, got {addr!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def server_credentials(cert: str | None, key: str | None) -> grpc.ServerCredentials | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise StartupError("--tls-cert and --tls-key go together")
    try:
        return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])
    except OSError as exc:
        raise StartupError(f"cannot read TLS certificate or key: {exc}") from exc


def check_port_free(host: str, port: int) -> None:
    """Fail with one line if the address is taken (gRPC would log its own multi-line complaint)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


async def build_authenticator(args: argparse.Namespace,
                              target: apiserver_mod.ApiServer) -> tuple[ConnectionAuthenticator, str]:
    """Token passthrough, or OIDC with impersonation when --authentication-config is given."""
    if not args.authentication_config:
        if args.serviceaccount_issuer:
            raise StartupError("--serviceaccount-issuer needs --authentication-config")
        return TokenPassthrough(), "token-passthrough"
    try:
        config = load_config(args.authentication_config)
    except ConfigError as exc:
        raise StartupError(str(exc)) from None
    if not target.token.get():
        raise StartupError(
            "OIDC mode needs the proxy's own ServiceAccount token (in-cluster, or token/tokenFile in --kubeconfig)"
        )
    issuers = list(args.serviceaccount_issuer or [])
    if not issuers:
        try:
            issuers = [await serviceaccount_issuer(target), LEGACY_SERVICEACCOUNT_ISSUER]
        except (ApiError, OSError, TimeoutError) as exc:
            raise StartupError(
                f"cannot read the cluster's ServiceAccount issuer ({exc}); give --serviceaccount-issuer"
            ) from None
    verifier = Verifier(config)
    await verifier.prefetch()
    log.info("oidc authentication", issuers=list(verifier.issuer_urls), serviceaccount_issuers=issuers)
    return OIDCAuthenticator(verifier, target.token.get, AccessReviewer(target), issuers), "oidc"


async def serve(args: argparse.Namespace) -> None:
    host, port = split_listen(args.listen)
    credentials = server_credentials(args.tls_cert, args.tls_key)
    if credentials is None and not is_loopback(host):
        raise StartupError(
            f"refusing to serve plaintext gRPC on non-loopback address {args.listen}; give --tls-cert and --tls-key"
        )
    # Opened first: a path that cannot be written is the whole start's one-line error.
    audit_log = AuditLog.open(args.audit_log) if args.audit_log else None
    target = apiserver_mod.from_kubeconfig(args.kubeconfig) if args.kubeconfig else apiserver_mod.in_cluster()

    authenticator, mode = await build_authenticator(args, target)

    check_port_free(host, port)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pool = UpstreamPool(target.connect)
    if not args.request_head_timeout > 0:
        raise StartupError("--request-head-timeout must be a positive number of seconds")
    service = AuthProxyService(target, authenticator, cluster=args.cluster, connect_upstream=pool.connect,
                               head_timeout=args.request_head_timeout, audit_log=audit_log)
    tunnel_pb2_grpc.add_AuthProxyServicer_to_server(service, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {args.listen}: address in use or not available") from exc
    if bound == 0:
        raise StartupError(f"cannot listen on {args.listen}: address in use or not available")

    metrics.gauge("clusterconnect_aadproxy_open_connections", "Downstream connections (from the agent) being served",
                  open_connections, stats="open_connections")
    metrics.gauge("clusterconnect_aadproxy_open_upstream_connections", "Connections to the apiserver open now",
                  open_upstream_connections, stats="open_upstream_connections")
    health.check("apiserver", aadproxy_metrics.apiserver_ready(target))
    health.add_to_server(server)
    await server.start()
    health.serving()
    log.info("listening", address=f"{host}:{bound}", tls=credentials is not None, apiserver=target.address,
             authentication=mode, audit_log=audit_log.name if audit_log else None)
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(pool.run())
            await server.wait_for_termination()
    finally:
        service.stopping = True
        await server.stop(grace=2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_service("aadproxy", args.log_level, lambda: serve(args), args.metrics_listen)


if __name__ == "__main__":
    main()
