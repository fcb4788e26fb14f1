"""`make demo-ha`: relay replicas on etcd on this machine, in the background (docs/replicas.md).

    demo_ha.py up --state-dir .demo-ha     devcluster, 3 etcd members (TLS), 3 relay replicas behind HAProxy
                                           (TCP mode), auth proxy, agent, client proxy; kubectl through them
    demo_ha.py down --state-dir .demo-ha   stop all of it

STATE/kubeconfig reaches cluster `demo-ha` with a ServiceAccount token (cluster-admin) that the auth
proxy passes through; STATE/topology.json names every process with its pid and ports, so that one
can be killed (`kill -9`, `kill -STOP`, `kill -TERM`) and the fleet watched taking over.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from chain import Chain, StartFailed, endpoint_only, start_devcluster
from demo import demo_workload, kubectl
from etcd_cluster import EtcdCluster
from relay_replicas import ReplicaSet

CLUSTER = "demo-ha"
NAMESPACE = "clusterconnect-demo"


def topology(state: Path, devcluster_pid: int, etcd: EtcdCluster | None, replicas: ReplicaSet | None,
             chain: Chain | None) -> dict:
    """Every process of the demo, in the order they started (`down` stops them last first)."""
    found: dict = {"devcluster": {"pid": devcluster_pid}, "etcd": [], "relays": []}
    for member in etcd.members if etcd else ():
        if member.process is not None:
            found["etcd"].append({"name": member.name, "pid": member.process.popen.pid,
                                  "client_url": member.client_url})
    if replicas is not None and chain is not None:
        if "haproxy" in chain.processes:
            found["haproxy"] = {"pid": chain.processes["haproxy"].popen.pid, **{
                f"{name}_port": port for name, port in replicas.front.items()}}
        for replica in replicas.replicas:
            if replica.name in chain.processes:
                found["relays"].append({
                    "name": replica.name, "pid": chain.processes[replica.name].popen.pid, "url": replica.url,
                    "agent_port": replica.agent_port, "issuer_port": replica.issuer_port,
                    "peer_port": replica.peer_port, "log": str(chain.processes[replica.name].log)})
        for key, name in (("auth_proxy", "aadproxy"), ("agent", "agent"), ("client_proxy", "proxy")):
            if name in chain.processes:
                found[key] = {"pid": chain.processes[name].popen.pid, "log": str(chain.processes[name].log)}
        if "aadproxy" in chain.processes:
            found["auth_proxy"]["port"] = chain.authproxy_port
    (state / "topology.json").write_text(json.dumps(found, indent=2) + "\n")
    return found


def up(state: Path) -> None:
    if (state / "topology.json").exists():
        down(state, quiet=True)
    shutil.rmtree(state, ignore_errors=True)
    (state / "logs").mkdir(parents=True)
    print("starting the devcluster ...", flush=True)
    devcluster, admin = start_devcluster(state / "devcluster", state / "logs" / "devcluster.out")
    topology(state, devcluster.pid, None, None, None)
    sa_token = demo_workload(admin, state)
    etcd = EtcdCluster(state / "etcd")
    chain = Chain(state, endpoint_only(admin, state / "authproxy.kubeconfig"), cluster=CLUSTER)
    replicas = ReplicaSet(chain, etcd)
    print("starting 3 etcd members, HAProxy and 3 relay replicas, the auth proxy, the agent, a client proxy ...",
          flush=True)
    try:
        etcd.start()
        replicas.start()
        chain.add_cluster()
        chain.start_authproxy()
        chain.start_agent()
        _, ready = chain.start_proxy(sa_token, state / "kubeconfig")
    finally:
        found = topology(state, devcluster.pid, etcd, replicas, chain)
    holder = replicas.holder()
    print(f"\nclient proxy: {ready}")
    print(f"the agent is on {holder.name} (pid {replicas.process(holder).popen.pid})")
    print(f"\n$ KUBECONFIG={state / 'kubeconfig'} kubectl get pods -n {NAMESPACE}", flush=True)
    print(kubectl(state / "kubeconfig", "get", "pods", "-n", NAMESPACE).rstrip())
    print(f"""
Processes: {state / 'topology.json'} (relays: {', '.join(f"{r['name']} pid {r['pid']}" for r in found['relays'])}).
Try: kill -9 the agent's replica, then `KUBECONFIG={state / 'kubeconfig'} kubectl get pods -n {NAMESPACE}` again;
     kill -TERM one to watch it drain (its log: "draining", "drained").
Stop everything with: make demo-ha-down""")


def _stop(pid: int, timeout: float = 30) -> None:
    """SIGTERM (a relay replica drains first), then SIGKILL after ``timeout``."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)  # polling a process that is not our child: no wait() to block on
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def down(state: Path, quiet: bool = False) -> None:
    path = state / "topology.json"
    if not path.exists():
        if not quiet:
            print("nothing to stop")
        return
    found = json.loads(path.read_text())
    ordered = [found.get(key) for key in ("client_proxy", "agent", "auth_proxy")]
    ordered += list(reversed(found.get("relays", []))) + [found.get("haproxy")]
    ordered += list(reversed(found.get("etcd", [])))
    for entry in ordered:
        if entry:
            _stop(int(entry["pid"]))
    devcluster = int(found["devcluster"]["pid"])
    try:
        os.killpg(devcluster, signal.SIGTERM)  # the devcluster runs in a process group of its own
    except ProcessLookupError:
        pass
    _stop(devcluster)
    path.unlink()
    if not quiet:
        print("demo-ha stopped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--state-dir", type=Path, default=Path(".demo-ha"))
    args = parser.parse_args()
    try:
        (up if args.action == "up" else down)(args.state_dir.resolve())
    except (StartFailed, FileNotFoundError) as exc:
        down(args.state_dir.resolve(), quiet=True)
        sys.exit(f"error: {exc}")
    except SystemExit:
        if args.action == "up":
            down(args.state_dir.resolve(), quiet=True)
        raise


if __name__ == "__main__":
    main()
