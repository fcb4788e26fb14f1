"""`make bench`: every scenario direct, through the tunnel (client proxy) and through the gateway (kubectl's
kubeconfig alone), alternating, several rounds, in one run.

    run.py [--smoke] [--rounds N] [--only small_get,big_list,...] [--no-peer] [--no-observed] [--out bench/results]

Konnectivity (bench/konnectivity.py, built from its Go module) is measured beside direct access and
the tunnel in every scenario where it applies, unless --no-peer. With small_get, a second chain whose
services export traces over OTLP and are scraped every second (bench/observed.py) answers small GETs
interleaved with the plain tunnel's, unless --no-observed: the report gives the two latencies side by side.

Writes <out>/<timestamp>.json, <timestamp>.md (also latest.md) and <timestamp>.png.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "deploy" / "local"))

import dataclasses  # noqa: E402

import yaml  # noqa: E402
from chain import Chain, endpoint_only, process_in_group, start_devcluster  # noqa: E402
from endpoints import Endpoint, proxy_client_files  # noqa: E402
from konnectivity import konnectivity  # noqa: E402
from observed import Observed, observed_chain, paired_small_get  # noqa: E402
from replicas import replicas_scenario  # noqa: E402
from report import write_report  # noqa: E402
from scale import scale  # noqa: E402
from scenarios import (  # noqa: E402
    Context,
    Sizes,
    big_list,
    dial,
    head_of_line,
    kubectl,
    port_forward,
    prepare_big_list,
    prepare_sink,
    small_get,
    watches,
)

SCENARIOS = ["small_get", "big_list", "port_forward", "dial", "watches", "head_of_line", "scale", "replicas"]


def tunnel_endpoint(kubeconfig: Path, token: str, proxy_state: Path) -> Endpoint:
    config = yaml.safe_load(kubeconfig.read_text())
    cluster = config["clusters"][-1]["cluster"]
    host, port = cluster["server"].removeprefix("https://").rsplit(":", 1)
    return Endpoint("tunnel", host, int(port), base64.b64decode(cluster["certificate-authority-data"]).decode(), token,
                    client_files=proxy_client_files(proxy_state))


def direct_endpoint(admin_kubeconfig: Path, token: str) -> Endpoint:
    config = yaml.safe_load(admin_kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    host, port = cluster["server"].removeprefix("https://").rsplit(":", 1)
    return Endpoint("direct", host, int(port), base64.b64decode(cluster["certificate-authority-data"]).decode(), token)


def token_kubeconfig(admin_kubeconfig: Path, token_file: Path, path: Path) -> Path:
    config = yaml.safe_load(admin_kubeconfig.read_text())
    config["users"] = [{"name": "bench", "user": {"tokenFile": str(token_file)}}]
    for context in config["contexts"]:
        context["context"]["user"] = "bench"
    path.write_text(yaml.safe_dump(config))
    return path


SERVICES = ("relay", "agent", "aadproxy", "proxy")
GATEWAY_SERVICES = ("relay", "agent", "aadproxy", "gateway")


def gateway_endpoint(chain: Chain, token: str) -> Endpoint:
    """The gateway on 127.0.0.1, the cluster named by SNI (as tls-server-name makes kubectl send it)."""
    return Endpoint("gateway", "127.0.0.1", chain.gateway_port, chain.gateway_ca.read_text(), token,
                    server_name=f"{chain.cluster}.{chain.cluster_domain}")


def peer_endpoint(direct: Endpoint, frontend: Path) -> Endpoint:
    """The apiserver as direct access sees it, reached through Konnectivity's frontend."""
    return Endpoint("konnectivity", direct.host, direct.port, direct.ca_pem, direct.token, connect_proxy=frontend)


@contextmanager
def bench_setup(sizes: Sizes, peer: bool = True, observed: bool = True,
                results: dict | None = None) -> Iterator[tuple[Context, Chain, Path]]:
    """A devcluster with a cluster-admin ServiceAccount token, the whole tunnel chain in front of it,
    (``peer``) Konnectivity beside it and (``observed``) a second chain, traced and scraped; yields
    (context, chain, token file) and stops everything after (the observed chain's counts into
    ``results["observed"]``)."""
    work = Path(tempfile.mkdtemp(prefix="clusterconnect-bench-"))
    devcluster, admin = start_devcluster(work / "devcluster", work / "devcluster.out")
    chain = None
    try:
        ns = "bench"
        kubectl(admin, "create", "namespace", ns)
        kubectl(admin, "create", "serviceaccount", "bench-user", "-n", ns)
        kubectl(admin, "create", "clusterrolebinding", "bench-user", "--clusterrole=cluster-admin",
                f"--serviceaccount={ns}:bench-user")
        token = kubectl(admin, "create", "token", "bench-user", "-n", ns, "--duration=6h").strip()
        token_file = work / "bench-user.token"
        token_file.write_text(token)
        chain = Chain(work / "chain", endpoint_only(admin, work / "endpoint.kubeconfig"))
        tunnel_kubeconfig = work / "tunnel.kubeconfig"
        chain.start_all(token_file, tunnel_kubeconfig)
        chain.start_gateway()
        gateway_kubeconfig = chain.gateway_kubeconfig(work / "gateway.kubeconfig", token_file=token_file)
        with ExitStack() as stack:
            direct = direct_endpoint(admin, token)
            peer_tunnel = stack.enter_context(konnectivity(chain, work / "konnectivity")) if peer else None
            # Its counts once it stopped (its last spans are flushed then): the callback runs after its exit.
            stopped: list[Observed] = []
            if results is not None:
                stack.callback(lambda: stopped and results.__setitem__("observed", stopped[0].summary()))
            watched = stack.enter_context(observed_chain(work, chain.cluster_kubeconfig, token_file)) \
                if observed else None
            stopped += [watched] if watched else []
            yield Context(
                direct=direct,
                tunnel=tunnel_endpoint(tunnel_kubeconfig, token, chain.state_dir / "proxy-state"),
                admin_kubeconfig=admin,
                kubeconfigs={"direct": token_kubeconfig(admin, token_file, work / "direct.kubeconfig"),
                             "tunnel": tunnel_kubeconfig, "gateway": gateway_kubeconfig},
                namespace=ns, sizes=sizes, work_dir=work,
                pids={name: chain.processes[name].popen.pid for name in SERVICES},
                logs={name: chain.processes[name].log for name in {*SERVICES, *GATEWAY_SERVICES}},
                gateway=gateway_endpoint(chain, token),
                gateway_pids={name: chain.processes[name].popen.pid for name in GATEWAY_SERVICES},
                apiserver_pid=process_in_group(devcluster.pid, "kube-apiserver"),
                peer=peer_endpoint(direct, peer_tunnel.socket) if peer_tunnel else None,
                peer_pids={"server": peer_tunnel.server.popen.pid, "agent": peer_tunnel.agent.popen.pid}
                if peer_tunnel else {},
                observed=dataclasses.replace(
                    tunnel_endpoint(watched.kubeconfig, token, watched.chain.state_dir / "proxy-state"),
                    name="observed") if watched else None,
                observed_pids={name: watched.chain.processes[name].popen.pid for name in SERVICES}
                if watched else {},
            ), chain, token_file
    finally:
        if chain is not None:
            chain.stop_all()
        os.killpg(devcluster.pid, signal.SIGTERM)
        try:
            devcluster.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(devcluster.pid, signal.SIGKILL)
            devcluster.wait()


def run(args: argparse.Namespace) -> Path:
    sizes = Sizes.smoke() if args.smoke else Sizes()
    rounds = 1 if args.smoke else args.rounds
    only = args.only.split(",") if args.only else SCENARIOS
    results: dict = {"rounds": rounds, "smoke": args.smoke, "sizes": vars(sizes), "scenarios": {}}
    observed = not args.no_observed and "small_get" in only
    with bench_setup(sizes, peer=not args.no_peer, observed=observed, results=results) as (ctx, chain, token_file):
        if "big_list" in only or "head_of_line" in only:
            prepare_big_list(ctx)
        sink_port = prepare_sink(ctx) if "port_forward" in only else 0
        per_endpoint = {
            "small_get": small_get, "big_list": big_list, "dial": dial, "watches": watches,
            "head_of_line": head_of_line,
            "port_forward": lambda c, e: port_forward(c, e, sink_port),
        }
        for name in [s for s in SCENARIOS if s in only and s in per_endpoint]:
            # port-forward is kubectl's: Konnectivity's Unix-socket frontend is not something kubectl dials.
            endpoints = [e for e in ctx.endpoints() if name != "port_forward" or e.name in ctx.kubeconfigs]
            data: dict[str, list] = {e.name: [] for e in endpoints}
            for round_number in range(rounds):
                order = endpoints if round_number % 2 == 0 else list(reversed(endpoints))
                for endpoint in order:
                    print(f"[{name}] round {round_number + 1}/{rounds} {endpoint.name}", flush=True)
                    try:
                        data[endpoint.name].append(per_endpoint[name](ctx, endpoint))
                    except Exception as exc:  # keep the figures of everything else
                        print(f"[{name}] {endpoint.name} failed: {exc!r}", flush=True)
                        results.setdefault("errors", []).append(f"{name} {endpoint.name}: {exc!r}")
            results["scenarios"][name] = data
        if ctx.observed is not None:
            results["observed_small_get"] = []
            for round_number in range(rounds):
                print(f"[small_get] round {round_number + 1}/{rounds} tunnel and observed, interleaved", flush=True)
                results["observed_small_get"].append(paired_small_get(ctx, ctx.tunnel, ctx.observed))
        if "scale" in only:
            results["scenarios"]["scale"] = []
            for n in sizes.scale_agents:
                print(f"[scale] {n} agents", flush=True)
                try:
                    results["scenarios"]["scale"].append(scale(ctx, n, chain.cluster_kubeconfig, token_file))
                except Exception as exc:  # keep the figures of everything else
                    print(f"[scale] {n} agents failed: {exc}", flush=True)
                    results.setdefault("errors", []).append(f"scale {n}: {exc}")
        if "replicas" in only:
            try:
                results["scenarios"]["replicas"] = replicas_scenario(ctx, chain.cluster_kubeconfig, token_file,
                                                                     rounds, args.smoke)
            except Exception as exc:  # keep the figures of everything else
                print(f"[replicas] failed: {exc}", flush=True)
                results.setdefault("errors", []).append(f"replicas: {exc}")
        results["machine"] = {"cores": os.cpu_count(), "python": sys.version.split()[0]}
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return write_report(results, Path(args.out), stamp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: keeps the harness working")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="comma-separated scenarios: " + ",".join(SCENARIOS))
    parser.add_argument("--no-peer", action="store_true", help="without Konnectivity beside the tunnel")
    parser.add_argument("--no-observed", action="store_true",
                        help="without the traced and scraped chain beside the tunnel in small_get")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    report = run(args)
    print(report.read_text())


if __name__ == "__main__":
    main()
