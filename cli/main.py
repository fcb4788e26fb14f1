"""clusterconnect: reach a cluster through the relay (`proxy`) or a gateway (`kubeconfig`), log in (`login`,
`token`), administer the relay (`clusters`, `users`, `keys`) and onboard a cluster (`connect`, `disconnect`)."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from clusterconnect import cliargs, service
from clusterconnect.cli import background, kubeconfig_command, output, profile
from clusterconnect.cli import completion as completion_script
from clusterconnect.cli import connect as connect_cli
from clusterconnect.cli import identity as identity_cli
from clusterconnect.cli.usage import fail, read_file
from clusterconnect.clientproxy import kubeconfig
from clusterconnect.clientproxy.proxy import ProxySettings, run_proxy
from clusterconnect.clientproxy.tunnel import REQUEST_HEAD_TIMEOUT
from clusterconnect.errors import ClusterConnectError, InvalidInput
from clusterconnect.grpc_options import CHANNEL_OPTIONS, bearer, grpc_target
from clusterconnect.humanize import ago
from clusterconnect.v1 import tunnel_pb2, tunnel_pb2_grpc


def _state_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "clusterconnect"


def _profile_dir(args: argparse.Namespace) -> Path:
    """Where the profile is: the command's --state-dir; for the admin commands, which have none, its
    environment variable or the default."""
    state_dir = getattr(args, "state_dir", None)
    return Path(state_dir or os.environ.get(cliargs.env_name("--state-dir")) or _state_dir())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clusterconnect", description=__doc__)
    cliargs.add_version(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    proxy = commands.add_parser("proxy", help="serve a cluster's API on 127.0.0.1 for kubectl")
    proxy.add_argument("cluster", help="cluster name at the relay")
    _relay_flags(proxy)
    cliargs.add_flag(proxy, "--port", type=int, default=47011, help="local port (0: any free port)")
    tokens = proxy.add_mutually_exclusive_group()
    cliargs.add_flag(tokens, "--token", help="bearer token for the cluster (a ServiceAccount token)")
    cliargs.add_flag(tokens, "--token-file", type=Path, help="file holding the bearer token")
    cliargs.add_flag(tokens, "--kubeconfig-user", help="wrap this user of the kubeconfig (--kubeconfig-out's file):"
                     " the proxy dials with its token or tokenFile, and the context's user (with the proxy's"
                     " client certificate) carries the same; the wrapped user stays as it was")
    cliargs.add_flag(tokens, "--login", help="use this login (clusterconnect login); kubectl then gets tokens from"
                     " `clusterconnect token` (default without --token/--token-file: the login at --relay)")
    cliargs.add_flag(proxy, "--kubeconfig-out", help="kubeconfig file to merge the context into, or - to print it"
                     " (default: the KUBECONFIG list by kubectl's rules, else ~/.kube/config)")
    cliargs.add_flag(proxy, "--context-name", help="name of the kubeconfig context (default: RELAYHOST-CLUSTER);"
                     " a context of that name that clusterconnect did not write is never overwritten")
    cliargs.add_flag(proxy, "--state-dir", type=Path, default=_state_dir(),
                     help="where the local TLS CAs and certificates and the logins are kept")
    cliargs.add_flag(proxy, "--request-head-timeout", type=float, default=REQUEST_HEAD_TIMEOUT,
                     help="seconds a client has after its TLS handshake to send its first request's head")
    cliargs.add_flag(proxy, "--log-level", default="warning", help="debug, info, warning or error")
    # Off by default: a user may run one proxy per cluster, and a fixed port would let only the first start.
    cliargs.add_flag(proxy, "--metrics-listen", default="",
                     help="HOST:PORT for /metrics, /healthz and /readyz (plain HTTP; default: none)")
    cliargs.add_flag(proxy, "--background", action="store_true",
                     help="run in the background once ready (log in STATE_DIR/proxies/); `clusterconnect proxy"
                     " stop [CONTEXT|CLUSTER]` stops it")

    clusters = commands.add_parser("clusters", help="administer the clusters registered at the relay")
    actions = clusters.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="register a cluster and print the command that joins its agent")
    add.add_argument("name")
    cliargs.add_flag(add, "--authproxy", default="127.0.0.1:8080",
                     help="auth proxy address to put in the agent command")
    cliargs.add_flag(add, "--json", action="store_true", help="the same as -o json")
    output.add_flag(add)  # json/yaml: cluster, join_token, relay_ca_hash, expires_unix, agent_command
    _admin_flags(add)
    listing = actions.add_parser("list", help="table of clusters and their connectivity")
    output.add_flag(listing)
    _admin_flags(listing)
    show = actions.add_parser("show", help="one cluster: its connectivity and versions")
    show.add_argument("name")
    output.add_flag(show)
    _admin_flags(show)
    remove = actions.add_parser("remove", help="remove a cluster and disconnect its agent")
    remove.add_argument("name")
    _admin_flags(remove)
    identity_cli.add_parsers(commands, actions, _admin_flags, _state_dir())
    kubeconfig_command.add_parser(commands, _state_dir())
    connect_cli.add_parsers(commands, _admin_flags)
    completion = commands.add_parser("completion", help="print a shell completion script: source <(clusterconnect"
                                     " completion bash)")
    completion.add_argument("shell", choices=completion_script.SHELLS)
    return parser


def stop_parser() -> argparse.ArgumentParser:
    """`clusterconnect proxy stop [NAME]`: argparse cannot hold it under `proxy`, whose first word is the
    cluster, so main() picks it by its first two words (a cluster named stop: `proxy -- stop`)."""
    parser = argparse.ArgumentParser(prog="clusterconnect proxy stop",
                                     description="stop background proxies (proxy --background)")
    parser.add_argument("name", nargs="?", help="context or cluster of the proxy to stop (default: all of them)")
    cliargs.add_flag(parser, "--state-dir", type=Path, default=_state_dir(), help="the proxies' --state-dir")
    return parser


def _relay_flags(parser: argparse.ArgumentParser) -> None:
    cliargs.add_flag(parser, "--relay", help="relay URL, e.g. https://relay.example.com:8443 (default: the relay"
                     " of the last `clusterconnect login --relay`)")
    cliargs.add_flag(parser, "--relay-ca", type=Path, help="CA bundle that signed the relay's certificate"
                     " (default: the one given to that login, for its relay)")


def _admin_flags(parser: argparse.ArgumentParser) -> None:
    _relay_flags(parser)
    cliargs.add_flag(parser, "--admin-credential", type=Path, required=True,
                     help="file with the relay's admin credential (DATA_DIR/admin.credential)")


def _wrapped(args: argparse.Namespace) -> kubeconfig.WrappedCredential:
    """The credential of the kubeconfig user the proxy is asked to wrap (checked before anything is written)."""
    if args.kubeconfig_out == "-":
        raise InvalidInput("--kubeconfig-user reads the user from the kubeconfig file; --kubeconfig-out - has none")
    paths = [Path(args.kubeconfig_out)] if args.kubeconfig_out else kubeconfig.files()
    return kubeconfig.wrapped_credential(paths, args.kubeconfig_user)


def proxy_command(args: argparse.Namespace, remembered: profile.Profile | None) -> None:
    if not (0 < args.request_head_timeout < math.inf):  # also refuses nan
        raise InvalidInput(f"--request-head-timeout must be a positive number of seconds: {args.request_head_timeout}")
    if args.kubeconfig_user:
        wrapped = _wrapped(args)
        args.token, args.token_file = wrapped.token, wrapped.token_file
    if args.token_file:
        token = read_file(args.token_file, "token file").decode().strip()
    else:
        token = (args.token or "").strip()
    if args.login or token or args.token_file:
        login = args.login
    else:  # the login of this relay, else the one logged in with this relay (the profile's)
        login = identity_cli.default_login(args.relay, args.state_dir) or (remembered.login if remembered else None)
    if not token and not login:
        fail("a token is needed: --token TOKEN or --token-file FILE (a ServiceAccount token of the cluster),"
             " or log in first (clusterconnect login --relay URL --code CODE) or give --login NAME")
    context = args.context_name or kubeconfig.context_name(args.relay, args.cluster)
    settings = ProxySettings(
        cluster=args.cluster, relay=args.relay,
        relay_ca=read_file(args.relay_ca, "relay CA") if args.relay_ca else None,
        port=args.port, token=token, token_file=args.token_file, state_dir=args.state_dir,
        kubeconfig_out=args.kubeconfig_out, context=context,
        login=login,
        token_command=identity_cli.token_command_argv(args.cluster, login, args.state_dir) if login else None,
        request_head_timeout=args.request_head_timeout,
    )
    def run() -> None:
        service.run_service("clientproxy", args.log_level, lambda: run_proxy(settings), args.metrics_listen)

    if args.background:
        if args.kubeconfig_out == "-":
            raise InvalidInput("--background writes the context into a kubeconfig file; --kubeconfig-out - has none")
        background.start(args.state_dir, args.cluster, context, run)
    else:
        run()


async def _admin_call(args: argparse.Namespace, method: str, request: Message) -> Any:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read_file(args.relay_ca, "relay CA") if args.relay_ca else None
    )
    admin = read_file(args.admin_credential, "admin credential").decode().strip()
    async with grpc.aio.secure_channel(grpc_target(args.relay), credentials, options=CHANNEL_OPTIONS) as channel:
        stub = tunnel_pb2_grpc.RegistryStub(channel)
        return await getattr(stub, method)(request, metadata=(bearer(admin),), timeout=10)


def clusters_command(args: argparse.Namespace) -> None:
    # action -> (RPC, its request, how its reply is shown)
    requests: dict[str, tuple[str, Callable[[], Message], Callable[[argparse.Namespace, Any], None]]] = {
        "add": ("AddCluster", lambda: tunnel_pb2.AddClusterRequest(name=args.name), _print_added),
        "list": ("ListClusters", tunnel_pb2.ListClustersRequest,
                 lambda _, reply: _print_clusters(args, [cluster_record(c) for c in reply.clusters])),
        "show": ("GetCluster", lambda: tunnel_pb2.GetClusterRequest(name=args.name),
                 lambda _, reply: _print_clusters(args, cluster_record(reply))),
        "remove": ("RemoveCluster", lambda: tunnel_pb2.RemoveClusterRequest(name=args.name), _print_removed),
    }
    method, build, show = requests[args.action]
    try:
        reply = asyncio.run(_admin_call(args, method, build()))
    except grpc.aio.AioRpcError as exc:
        fail(exc.details() or exc.code().name)
    show(args, reply)


def _print_removed(args: argparse.Namespace, reply: tunnel_pb2.RemoveClusterResponse) -> None:
    print(f"cluster {args.name} removed; its agent was disconnected and its certificate no longer works")


def _print_added(args: argparse.Namespace, reply: tunnel_pb2.AddClusterResponse) -> None:
    # The token goes in the agent's environment, never its argv, which every local user can read (ps).
    # (A shell assignment before a command is not part of any argv; /proc/PID/environ is the owner's only.)
    command = (f"CLUSTERCONNECT_JOIN_TOKEN={reply.join_token} clusterconnect-agent --relay {args.relay}"
               f" --cluster {args.name} --relay-ca-hash {reply.relay_ca_hash} --authproxy {args.authproxy}")
    if args.json or output.machine_readable(args):
        if args.json:
            args.output = "json"
        output.dump(args, {"cluster": args.name, "join_token": reply.join_token, "relay_ca_hash": reply.relay_ca_hash,
                           "expires_unix": reply.join_token_expires_unix, "agent_command": command})
        return
    expires = time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(reply.join_token_expires_unix))
    print(f"cluster {args.name} added; its agent joins once with the token below (valid until {expires},"
          " shown only once), pins the relay CA by its hash and from then on uses its own certificate.")
    print("run the agent in the cluster with (keep --state-dir on a volume; the token may also come from a file"
          " with --join-token-file PATH, or from a Secret as in deploy/k8s):")
    print(f"  {command}")


def cluster_record(cluster: tunnel_pb2.Cluster) -> output.Record:
    """A cluster for -o json/yaml (and the table): stable field names, unknown values null."""
    return {
        "name": cluster.name,
        "status": "Connected" if cluster.connected else "Disconnected",
        "connected": cluster.connected,
        "last_seen_unix": cluster.last_seen_unix or None,
        "created_unix": cluster.created_unix or None,
        "agent_version": cluster.agent_version or None,
        "kubernetes_version": cluster.kubernetes_version or None,
        "replica": cluster.replica or None,
    }


def _seen(record: output.Record) -> str:
    if record["connected"]:
        return "now"
    return ago(time.time() - record["last_seen_unix"]) if record["last_seen_unix"] else "never"


CLUSTER_COLUMNS = (("NAME", lambda r: r["name"]), ("STATUS", lambda r: r["status"]), ("LAST SEEN", _seen),
                   ("AGENT", lambda r: output.or_dash(r["agent_version"])),
                   ("KUBERNETES", lambda r: output.or_dash(r["kubernetes_version"])),
                   ("REPLICA", lambda r: output.or_dash(r["replica"])))


def _print_clusters(args: argparse.Namespace, records: output.Record | list[output.Record]) -> None:
    output.emit(args, records, CLUSTER_COLUMNS)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:2] == ["proxy", "stop"]:
            stop = stop_parser().parse_args(argv[2:])
            background.stop(stop.state_dir, stop.name)
            return
        args = parse_args(argv)
        remembered = None if args.command == "login" else profile.apply(args, _profile_dir(args))
        if args.command == "proxy":
            proxy_command(args, remembered)
        elif args.command == "completion":
            print(completion_script.script(args.shell, build_parser(), {"proxy stop": stop_parser()}), end="")
        elif args.command == "kubeconfig":
            kubeconfig_command.kubeconfig_command(args)
        elif identity_cli.handles(args):
            identity_cli.run(args)
        elif connect_cli.handles(args):
            connect_cli.run(args)
        else:
            clusters_command(args)
    except ClusterConnectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main(sys.argv[1:])
