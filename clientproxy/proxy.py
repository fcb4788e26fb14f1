"""`clusterconnect proxy CLUSTER`: a local HTTPS endpoint for kubectl, and its kubeconfig context."""

from __future__ import annotations

import asyncio
import errno
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import h11

from clusterconnect import health
from clusterconnect.clientproxy import kubeconfig
from clusterconnect.clientproxy import metrics as clientproxy_metrics
from clusterconnect.clientproxy.local_tls import LocalTls, local_tls
from clusterconnect.clientproxy.probe import probe
from clusterconnect.clientproxy.tunnel import HANDSHAKE_TIMEOUT, REQUEST_HEAD_TIMEOUT, ConnectionHandler, TunnelTarget
from clusterconnect.credentials import CachedTokenSource, LoginError
from clusterconnect.errors import StartupError
from clusterconnect.grpc_options import CHANNEL_OPTIONS, grpc_target
from clusterconnect.logs import get_logger

log = get_logger(__name__)

PROBE_INTERVAL = 1.0


@dataclass
class ProxySettings:
    cluster: str
    relay: str
    relay_ca: bytes | None
    port: int
    token: str
    token_file: Path | None
    state_dir: Path
    kubeconfig_out: str | None  # None: the KUBECONFIG list, else ~/.kube/config; "-": print; else a path
    context: str  # the kubeconfig context's name (kubeconfig.context_name by default)
    # A login (clusterconnect login) instead of a fixed token: the Dial token comes from it, and the
    # kubeconfig user runs `clusterconnect token` (exec credential plugin).
    login: str | None = None
    token_command: list[str] | None = None  # argv of `clusterconnect token ...` for the kubeconfig
    # How long a client has, from the end of its TLS handshake, to send the head of its first request.
    request_head_timeout: float = REQUEST_HEAD_TIMEOUT


async def run_proxy(settings: ProxySettings) -> None:
    tls = local_tls(settings.state_dir)
    target = grpc_target(settings.relay)  # InvalidInput: one line and exit code 2 (clusterconnect.service)
    credentials = grpc.ssl_channel_credentials(root_certificates=settings.relay_ca)
    async with grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS) as channel:
        tokens = CachedTokenSource(settings.state_dir, settings.login) if settings.login else None
        if tokens is not None:
            try:
                await tokens.get()
            except LoginError as exc:
                raise StartupError(str(exc)) from None
        handler = ConnectionHandler(
            channel,
            TunnelTarget(settings.relay, settings.cluster, settings.token, tokens),
            request_head_timeout=settings.request_head_timeout,
        )
        try:
            server = await asyncio.get_running_loop().create_server(
                handler.protocol, "127.0.0.1", settings.port, ssl=tls.server, backlog=1024,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"port {settings.port} on 127.0.0.1 is already in use (another proxy?); pick another with --port"
                ) from None
            raise StartupError(f"cannot listen on 127.0.0.1:{settings.port}: {exc.strerror}") from None
        port = server.sockets[0].getsockname()[1]
        clientproxy_metrics.register(handler, channel)
        # Leaving: the handler cancels its connections first, then the server closes.
        async with server, handler.serving():
            exec_user = None
            if settings.token_command:
                exec_user = kubeconfig.exec_credential(settings.token_command[0], settings.token_command[1:])
            entries = kubeconfig.build_entries(
                settings.context, f"https://127.0.0.1:{port}", tls.ca_pem, tls.client, settings.token,
                settings.token_file, exec_user,
            )
            where = _write_kubeconfig(settings.kubeconfig_out, entries)
            version = await _wait_until_reachable(port, tls, settings, handler.target)
            health.serving()
            print(
                f"ready https://127.0.0.1:{port} context={settings.context} kubeconfig={where} kubernetes={version}",
                flush=True,
            )
            await server.serve_forever()


def _write_kubeconfig(out: str | None, entries: dict[str, Any]) -> str:
    if out == "-":
        print(kubeconfig.render(kubeconfig.merge(None, entries)), flush=True)
        return "-"
    paths = [Path(out)] if out else kubeconfig.files()
    try:
        return str(kubeconfig.write(paths, entries))
    except kubeconfig.NotOurs as exc:
        raise StartupError(str(exc)) from None
    except (OSError, kubeconfig.KubeconfigInvalid) as exc:
        raise StartupError(f"cannot write kubeconfig {kubeconfig.default_file(paths)}: {exc}") from None


async def _wait_until_reachable(port: int, tls: LocalTls, settings: ProxySettings, target: TunnelTarget) -> str:
    """Probe until a request went through the whole path; report why not, once per distinct reason."""
    last = ""
    while True:
        try:
            result = await probe(port, tls.client_context(), await target.current_token())
        except LoginError as exc:
            raise StartupError(str(exc)) from None
        except (OSError, TimeoutError, ValueError, h11.ProtocolError) as exc:
            # h11: the connection closed before a whole response (e.g. the cluster's auth proxy still starting)
            reason = f"probe failed: {exc}"
        else:
            if result.status == 401:
                raise StartupError(
                    f"cluster {settings.cluster} rejected the token (401 Unauthorized): {result.message}"
                )
            if result.status == 403:
                # e.g. not (yet) on the cluster's access list at the relay: serve anyway, say why.
                print(f"warning: {result.message}", file=sys.stderr, flush=True)
                return "unknown"
            if 200 <= result.status < 500:
                return result.message
            reason = f"{result.status}: {result.message}"
        if reason != last:
            print(f"waiting: {reason}", file=sys.stderr, flush=True)
            last = reason
        await asyncio.sleep(PROBE_INTERVAL)
