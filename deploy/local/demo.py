"""`make demo`: the whole chain on this machine, on the built-in defaults, in the background.

    demo.py up --state-dir .demo     devcluster, relay, auth proxy, agent, client proxy; kubectl through it
    demo.py down --state-dir .demo   stop all of it
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from chain import Chain, StartFailed, endpoint_only, start_devcluster, wait_until

KUBECTL = "/usr/bin/kubectl"


HELLO_LOOP = "while true; do echo hello from $HOSTNAME; sleep 5; done"

def kubectl(kubeconfig: Path, *args: str, input: str | None = None) -> str:
    result = subprocess.run([KUBECTL, "--kubeconfig", str(kubeconfig), *args], input=input,
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"error: kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def demo_identity(admin: Path, state: Path) -> Path:
    kubectl(admin, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "clusterconnect-demo"}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "demo-user", "namespace": "clusterconnect-demo"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "clusterconnect-demo-user"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
         "subjects": [{"kind": "ServiceAccount", "name": "demo-user", "namespace": "clusterconnect-demo"}]},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "hello", "namespace": "clusterconnect-demo"},
         "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "hello"}},
                  "template": {"metadata": {"labels": {"app": "hello"}},
                               "spec": {"containers": [{"name": "hello", "image": "local",
                                                        "command": ["sh", "-c", HELLO_LOOP]}]}}}},
    ]}))
    token = kubectl(admin, "create", "token", "demo-user", "-n", "clusterconnect-demo", "--duration=24h").strip()
    path = state / "demo-user.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token)
    return path


def up(state: Path) -> None:
    if (state / "pids").exists():
        down(state, quiet=True)
    # Every demo starts afresh: a relay database of an earlier demo already knows cluster "demo".
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True, exist_ok=True)
    (state / "logs").mkdir(exist_ok=True)
    print("starting the devcluster (kube-apiserver, etcd, controller manager, scheduler, node) ...", flush=True)
    devcluster, admin = start_devcluster(state / "devcluster", state / "logs" / "devcluster.out")
    (state / "pids").write_text(f"{devcluster.pid}\n")
    token = demo_identity(admin, state)
    chain = Chain(state, endpoint_only(admin, state / "cluster-endpoint.kubeconfig"), cluster="demo")
    kubeconfig = state / "kubeconfig"
    print("starting relay, auth proxy, agent and client proxy ...", flush=True)
    try:
        ready = chain.start_all(token, kubeconfig)
    finally:
        (state / "pids").write_text(
            "\n".join([str(devcluster.pid), *(str(p.popen.pid) for p in chain.processes.values())]) + "\n")
    print(ready, flush=True)
    wait_until(lambda: kubectl(admin, "get", "pods", "-n", "clusterconnect-demo", "-o", "name").count("pod/") >= 2,
               60, "the demo pods")
    print(f"\n$ KUBECONFIG={kubeconfig} kubectl get pods -A    # through the tunnel", flush=True)
    print(kubectl(kubeconfig, "get", "pods", "-A"), flush=True)
    print(f"""The chain runs in the background (logs in {state}/logs). Try:
  export KUBECONFIG={kubeconfig}
  kubectl get pods -n clusterconnect-demo
  kubectl logs -f -n clusterconnect-demo deploy/hello
  kubectl exec -it -n clusterconnect-demo deploy/hello -- sh
  .venv/bin/clusterconnect clusters list --relay {chain.relay_url} --relay-ca {chain.relay_ca} \\
      --admin-credential {chain.admin_credential}
Stop everything with: make demo-down""")


def down(state: Path, quiet: bool = False) -> None:
    pids_file = state / "pids"
    if not pids_file.exists():
        if not quiet:
            print("nothing to stop")
        return
    pids = [int(p) for p in pids_file.read_text().split()]
    for pid in reversed(pids):
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    pids_file.unlink()
    if not quiet:
        print("demo stopped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--state-dir", type=Path, default=Path(".demo"))
    args = parser.parse_args()
    try:
        (up if args.action == "up" else down)(args.state_dir.resolve())
    except StartFailed as exc:
        down(args.state_dir.resolve(), quiet=True)
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
