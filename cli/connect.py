"""`clusterconnect connect NAME` and `clusterconnect disconnect NAME`: onboard a cluster in one command.

connect registers the cluster at the relay, installs the clusterconnect-agent chart into it with helm
(the join token reaches helm as a values document on its stdin and the chart puts it in a Secret: it is
never in an argv, a log or a file), waits until the relay reports the agent Connected and prints the
`clusterconnect proxy` command. Run again on a connected cluster it changes nothing. disconnect
uninstalls the release, deletes the agent's state claim (its identity is void once the cluster is
removed) and removes the cluster from the relay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import yaml

from clusterconnect import cliargs
from clusterconnect.cli.usage import CommandFailed, fail, read_file
from clusterconnect.errors import InvalidInput, NotFound, PermissionDenied, Unavailable
from clusterconnect.v1 import tunnel_pb2

# The chart of this checkout (an editable install); elsewhere give --chart.
DEFAULT_CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "clusterconnect-agent"
POLL = 0.5  # seconds between looks at the relay while the agent starts


class ClusterUnreachable(Unavailable):
    exit_code = 1


class MissingRights(PermissionDenied):
    exit_code = 1


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser],
                admin_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    connect = commands.add_parser("connect", help="register a cluster at the relay and install its agent with helm")
    connect.add_argument("name", help="the cluster's name at the relay")
    _cluster_flags(connect)
    admin_flags(connect)
    cliargs.add_flag(connect, "--agent-relay",
                     help="relay URL as the agent in the cluster reaches it (default: --relay)")
    cliargs.add_flag(connect, "--authentication-config", type=Path,
                     help="OIDC mode for the auth proxy: an AuthenticationConfiguration file (e.g. the relay's"
                          " built-in issuer); without it the proxy passes callers' tokens through")
    cliargs.add_flag(connect, "--values", "-f", action="append", type=Path, default=[], metavar="FILE",
                         help="more chart values (repeatable; they win over connect's own)")
    cliargs.add_flag(connect, "--chart", type=Path, default=DEFAULT_CHART, help="the clusterconnect-agent chart")
    cliargs.add_flag(connect, "--timeout", type=float, default=180.0,
                     help="seconds to wait for the agent to connect")
    disconnect = commands.add_parser("disconnect", help="uninstall a cluster's agent and remove it from the relay")
    disconnect.add_argument("name", help="the cluster's name at the relay")
    _cluster_flags(disconnect)
    admin_flags(disconnect)


def _cluster_flags(parser: argparse.ArgumentParser) -> None:
    cliargs.add_flag(parser, "--kubeconfig", type=Path, required=True, help="kubeconfig of the cluster")
    cliargs.add_flag(parser, "--context", help="context of --kubeconfig (default: its current context)")
    cliargs.add_flag(parser, "--namespace", default="clusterconnect", help="namespace of the agent's release")
    cliargs.add_flag(parser, "--release", default="clusterconnect", help="helm release name")
    cliargs.add_flag(parser, "--helm", default="helm", help="helm binary")
    cliargs.add_flag(parser, "--kubectl", default="kubectl", help="kubectl binary (to read the agent pod's failure)")


def handles(args: argparse.Namespace) -> bool:
    return args.command in ("connect", "disconnect")


def run(args: argparse.Namespace) -> None:
    (connect if args.command == "connect" else disconnect)(args)


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


class Cluster:
    """helm and kubectl against one kubeconfig context."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.helm = _binary(args.helm, "--helm")
        self.where = f"context {args.context}" if args.context else f"kubeconfig {args.kubeconfig}"

    def _access(self) -> list[str]:
        access = ["--kubeconfig", str(self.args.kubeconfig)]
        return access + (["--kube-context", self.args.context] if self.args.context else [])

    def helm_run(self, *argv: str, stdin: str | None = None, timeout: float = 300) -> str:
        try:
            result = subprocess.run([self.helm, *argv, *self._access(), "--namespace", self.args.namespace],
                                    input=stdin, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClusterUnreachable(f"helm {argv[0]} did not finish in {timeout:.0f}s ({self.where})") from None
        if result.returncode != 0:
            raise _cluster_error(f"helm {argv[0]}", result.stderr, self.where)
        return result.stdout

    def release(self) -> dict[str, Any] | None:
        """The release, if installed; also the check that the cluster is reachable and readable."""
        releases = json.loads(self.helm_run("list", "--all", "--filter", f"^{self.args.release}$", "-o", "json",
                                            timeout=60) or "[]")
        return releases[0] if releases else None

    def kubectl(self, *argv: str) -> subprocess.CompletedProcess[str]:
        access = ["--kubeconfig", str(self.args.kubeconfig)] + (["--context", self.args.context]
                                                                if self.args.context else [])
        binary = shutil.which(self.args.kubectl) or self.args.kubectl
        try:
            return subprocess.run([binary, *access, "--namespace", self.args.namespace, *argv],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return subprocess.CompletedProcess(argv, 1, "", str(exc))

    def agent_failure(self) -> str:
        """What the agent pod says about why it is not connected: its last warning or error, or its state."""
        name = f"{self.args.release}-agent"
        pods = self.kubectl("get", "pods", "-l", f"app.kubernetes.io/name={name}", "-o", "json")
        if pods.returncode != 0:
            return "no agent pod found"
        items = json.loads(pods.stdout).get("items", [])
        if not items:
            return "no agent pod yet"
        pod = items[0]
        statuses = pod.get("status", {}).get("containerStatuses") or []
        waiting = (statuses[0].get("state", {}).get("waiting") if statuses else None) or {}
        logs = self.kubectl("logs", pod["metadata"]["name"], "--tail", "50")
        for line in reversed(logs.stdout.splitlines()):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("level") in ("warning", "error"):
                detail = event.get("reason") or event.get("error") or ""
                return f"agent pod {pod['metadata']['name']}: {event.get('event')}" + (f": {detail}" if detail else "")
        if waiting:
            return f"agent pod {pod['metadata']['name']}: {waiting.get('reason')}: {waiting.get('message', '')}".strip()
        return f"agent pod {pod['metadata']['name']} is {pod.get('status', {}).get('phase', 'unknown')}"


def _binary(name: str, flag: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise InvalidInput(f"{name} not found: give {flag} PATH")
    return path


def _cluster_error(what: str, stderr: str, where: str) -> Exception:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    message = lines[-1] if lines else "no output"
    message = message.removeprefix("Error: ")
    if "forbidden" in message.lower():
        return MissingRights(f"missing rights in the cluster ({where}): {message}")
    if "unreachable" in message.lower() or "connection refused" in message.lower() or "no such host" in message:
        return ClusterUnreachable(f"cannot reach the cluster ({where}): {message}")
    return CommandFailed(f"{what} failed ({where}): {message}")


async def _call(args: argparse.Namespace, method: str, request: Any) -> Any:
    from clusterconnect.cli.main import _admin_call  # main imports this module

    try:
        return await _admin_call(args, method, request)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            raise NotFound(exc.details() or "not found") from None
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise Unavailable(f"relay {args.relay} unreachable: {exc.details() or exc.code().name}") from None
        fail(exc.details() or exc.code().name)


def _registered(args: argparse.Namespace) -> Any:
    reply = asyncio.run(_call(args, "ListClusters", tunnel_pb2.ListClustersRequest()))
    return next((c for c in reply.clusters if c.name == args.name), None)


def _values(args: argparse.Namespace, added: Any) -> str:
    """The chart values connect sets, as one YAML document for helm's stdin (it holds the join token)."""
    values: dict[str, Any] = {
        "cluster": args.name,
        "agent": {"relay": args.agent_relay or args.relay,
                  "join": {"token": added.join_token, "relayCAHash": added.relay_ca_hash}},
        "authProxy": {"tls": {"generate": True}},
    }
    if args.authentication_config:
        try:
            values["authProxy"]["authentication"] = yaml.safe_load(
                read_file(args.authentication_config, "authentication config"))
        except yaml.YAMLError as exc:
            raise InvalidInput(f"authentication config {args.authentication_config} is not YAML: {exc}") from None
    return yaml.safe_dump(values)


def _proxy_hint(args: argparse.Namespace) -> None:
    ca = f" --relay-ca {shlex.quote(str(args.relay_ca))}" if args.relay_ca else ""
    print("reach it with:")
    print(f"  clusterconnect proxy {args.name} --relay {args.relay}{ca}")
    print(f"  kubectl --context {args.name} get pods")


def connect(args: argparse.Namespace) -> None:
    if not args.chart.is_dir():
        raise InvalidInput(f"chart not found at {args.chart}: give --chart DIR")
    for path in args.values:
        read_file(path, "values file")
    cluster = Cluster(args)
    step(f"checking the cluster ({cluster.where})")
    release = cluster.release()
    step(f"checking the relay {args.relay}")
    registered = _registered(args)
    if registered is not None and release is not None:
        if registered.connected:
            print(f"cluster {args.name} is already connected (release {args.release} in namespace"
                  f" {args.namespace}); nothing changed")
            _proxy_hint(args)
            return
        step(f"cluster {args.name} is registered and its agent installed; waiting for it to connect")
        _wait_connected(args, cluster)
        _proxy_hint(args)
        return
    if registered is not None:
        raise InvalidInput(f"cluster {args.name} is registered at the relay but its agent is not installed here"
                           f" (release {args.release} in namespace {args.namespace}); run"
                           f" `clusterconnect disconnect {args.name}` first, or pick another name")
    if release is not None:
        raise InvalidInput(f"release {args.release} in namespace {args.namespace} exists but cluster {args.name}"
                           " is not registered at the relay; run `clusterconnect disconnect` first")
    step(f"registering cluster {args.name} at the relay")
    added = asyncio.run(_call(args, "AddCluster", tunnel_pb2.AddClusterRequest(name=args.name)))
    step(f"installing chart {args.chart.name} as release {args.release} in namespace {args.namespace}")
    try:
        extra = [arg for path in args.values for arg in ("-f", str(path))]
        # Our values first, on stdin (the token stays out of argv and files); the user's files win.
        cluster.helm_run("install", args.release, str(args.chart), "--create-namespace", "-f", "-", *extra,
                         stdin=_values(args, added))
    except BaseException:
        # Leave no registration whose token nothing holds.
        asyncio.run(_call(args, "RemoveCluster", tunnel_pb2.RemoveClusterRequest(name=args.name)))
        raise
    step("waiting for the agent to connect to the relay")
    _wait_connected(args, cluster)
    _proxy_hint(args)


def _wait_connected(args: argparse.Namespace, cluster: Cluster) -> None:
    started = time.monotonic()
    deadline = started + args.timeout
    while True:
        found = _registered(args)
        if found is not None and found.connected:
            print(f"cluster {args.name} connected in {time.monotonic() - started:.1f}s"
                  f" (agent {found.agent_version}, Kubernetes {found.kubernetes_version})")
            return
        if time.monotonic() > deadline:
            raise ClusterUnreachable(f"the agent did not connect within {args.timeout:.0f}s: {cluster.agent_failure()}")
        time.sleep(POLL)


def disconnect(args: argparse.Namespace) -> None:
    cluster = Cluster(args)
    step(f"checking the cluster ({cluster.where})")
    if cluster.release() is None:
        print(f"release {args.release} is not installed in namespace {args.namespace}")
    else:
        step(f"uninstalling release {args.release} from namespace {args.namespace}")
        cluster.helm_run("uninstall", args.release, "--wait", "--timeout", "120s")
    # The chart keeps the agent's identity on uninstall; once the cluster is removed it is void.
    claim = cluster.kubectl("delete", "persistentvolumeclaim", f"{args.release}-agent-state", "--ignore-not-found",
                            "--wait=false")
    if claim.returncode != 0:
        raise _cluster_error("kubectl delete", claim.stderr, cluster.where)
    step(f"removing cluster {args.name} from the relay")
    try:
        asyncio.run(_call(args, "RemoveCluster", tunnel_pb2.RemoveClusterRequest(name=args.name)))
    except NotFound:
        print(f"cluster {args.name} was not registered at the relay")
        return
    print(f"cluster {args.name} disconnected")
