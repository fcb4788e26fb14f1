"""`clusterconnect kubeconfig NAME --gateway URL`: a kubeconfig context that reaches cluster NAME through a
gateway (clusterconnect-gateway), with nothing running on this machine but kubectl and its exec plugin.

The gateway knows the cluster from the TLS server name (SNI) ``NAME.<cluster-domain>``. When the
gateway's own host is the cluster domain (wildcard DNS ``*.<cluster-domain>`` points at it), the server
is ``https://NAME.<cluster-domain>:PORT``. Otherwise (an IP address, or a balancer's name without
wildcard DNS) the server stays the gateway's address and ``tls-server-name`` carries the name.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from clusterconnect import cliargs, credentials
from clusterconnect.cli import identity as identity_cli
from clusterconnect.cli.usage import read_file
from clusterconnect.clientproxy import kubeconfig
from clusterconnect.errors import ClusterConnectError, InvalidInput
from clusterconnect.gateway.sni import cluster_domain, cluster_of


def add_parser(commands: Any, state_dir: Path) -> None:
    parser = commands.add_parser("kubeconfig", help="write a kubeconfig context that reaches a cluster through a"
                                 " gateway (no local proxy)")
    parser.add_argument("cluster", help="cluster name at the relay")
    cliargs.add_flag(parser, "--gateway", required=True, help="gateway URL, e.g. https://clusters.example.com:8447")
    cliargs.add_flag(parser, "--cluster-domain", help="the gateway's --cluster-domain (default: the gateway's host)")
    cliargs.add_flag(parser, "--gateway-ca", type=Path,
                     help="CA bundle of the gateway's certificate (default: the system's CAs)")
    user = parser.add_mutually_exclusive_group()
    cliargs.add_flag(user, "--login", help="login whose tokens kubectl gets from `clusterconnect token`"
                     " (default: the only login in --state-dir)")
    cliargs.add_flag(user, "--token-file", type=Path, help="file with a bearer token for kubectl to send"
                     " (e.g. a ServiceAccount token), instead of a login")
    cliargs.add_flag(parser, "--context", help="name of the context (default: the cluster name)")
    cliargs.add_flag(parser, "--kubeconfig-out", help="kubeconfig file to merge the context into, or - to print it"
                     " (default: the KUBECONFIG list by kubectl's rules, else ~/.kube/config)")
    cliargs.add_flag(parser, "--state-dir", type=Path, default=state_dir, help="where the logins are kept")


def server_entry(cluster: str, gateway: str, domain_flag: str | None) -> dict[str, str]:
    """The kubeconfig cluster's ``server`` (and ``tls-server-name``) for ``cluster`` behind ``gateway``."""
    parsed = urlparse(gateway)
    if parsed.scheme != "https" or not parsed.hostname or parsed.path not in ("", "/"):
        raise InvalidInput(f"--gateway must be https://HOST:PORT, got {gateway!r}")
    try:
        port = parsed.port or 443
    except ValueError:
        raise InvalidInput(f"--gateway has no valid port: {gateway!r}") from None
    host = parsed.hostname.lower()
    try:
        ipaddress.ip_address(host)
        is_address = True
    except ValueError:
        is_address = False
    if domain_flag is None and is_address:
        raise InvalidInput(f"--gateway {gateway} is an address: give --cluster-domain (the gateway's)")
    domain = cluster_domain(domain_flag if domain_flag is not None else host)
    server_name = f"{cluster}.{domain}"
    try:
        cluster_of(server_name, domain)
    except ClusterConnectError:
        raise InvalidInput(f"{cluster!r} is not a cluster name (one DNS label: a-z, 0-9, '-')") from None
    if host == domain:
        return {"server": f"https://{server_name}:{port}"}
    address = f"[{host}]" if ":" in host else host
    return {"server": f"https://{address}:{port}", "tls-server-name": server_name}


def _user(args: argparse.Namespace) -> dict[str, Any]:
    if args.token_file is not None:
        read_file(args.token_file, "token file")  # exists and is readable now, not at kubectl's first request
        return {"tokenFile": str(args.token_file.resolve())}
    login = args.login
    if not login:
        logins = credentials.list_logins(args.state_dir)
        if len(logins) != 1:
            raise InvalidInput("not logged in: run `clusterconnect login` first, or give --token-file" if not logins
                               else f"several logins ({', '.join(logins)}): choose one with --login")
        login = logins[0]
    elif login not in credentials.list_logins(args.state_dir):
        raise InvalidInput(f"no login {login!r} in {args.state_dir} (clusterconnect login ... --name {login})")
    argv = identity_cli.token_command_argv(args.cluster, login, args.state_dir)
    return kubeconfig.exec_credential(argv[0], argv[1:])


def entries(args: argparse.Namespace) -> dict[str, Any]:
    cluster = server_entry(args.cluster, args.gateway, args.cluster_domain)
    if args.gateway_ca is not None:
        cluster["certificate-authority-data"] = base64.b64encode(read_file(args.gateway_ca, "gateway CA")).decode()
    context = args.context or args.cluster
    user_name = f"clusterconnect-gateway-{context}"
    return {
        "cluster": {"name": context, "cluster": cluster},
        "user": {"name": user_name, "user": _user(args)},
        "context": {"name": context, "context": {"cluster": context, "user": user_name}},
    }


def kubeconfig_command(args: argparse.Namespace) -> None:
    written = entries(args)
    if args.kubeconfig_out == "-":
        print(kubeconfig.render(kubeconfig.merge(None, written)), end="")
        return
    paths = [Path(args.kubeconfig_out)] if args.kubeconfig_out else kubeconfig.files()
    try:
        path = kubeconfig.write(paths, written, name_flag="--context")
    except OSError as exc:
        raise InvalidInput(f"cannot write kubeconfig {kubeconfig.default_file(paths)}: {exc.strerror}") from None
    server = written["cluster"]["cluster"]
    name = f" (tls-server-name {server['tls-server-name']})" if "tls-server-name" in server else ""
    print(f"context {written['context']['name']} written to {path}: server {server['server']}{name}")
