"""`make demo`: the whole chain on this machine, on the built-in defaults, in the background.

    demo.py up --state-dir .demo     devcluster, relay, the agent chart via `clusterconnect connect`, client proxies
    demo.py down --state-dir .demo   stop all of it (the devcluster's end takes its pods' processes along)

The main path (STATE/kubeconfig): `clusterconnect connect demo` registers the devcluster at the relay and
installs the clusterconnect-agent chart into it, so the agent and the auth proxy run as pods; the auth
proxy, in OIDC mode trusting the relay's built-in issuer, verifies a built-in user's token (the user logs
in with a one-time code) and impersonates them, so the cluster's RBAC decides for `demo-user`. The
ServiceAccount path (STATE/kubeconfig-sa): a ServiceAccount token that an auth proxy passes through
untouched. The relay admits a ServiceAccount token only to a cluster without an access list, so that path
uses a second cluster name, `demo-sa`, connected the same way (its own release, in its own namespace);
`demo` has an access list.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from agent_chart import devcluster_values, state_volume
from authentication import builtin_issuer, write_authentication_config
from chain import ROOT, Chain, StartFailed, free_port, script, start_devcluster, wait_until

KUBECTL = "/usr/bin/kubectl"
HELM = ROOT / "tools/helm/bin/helm"  # `make helm`, which `make demo` runs
NAMESPACE = "clusterconnect-demo"
USER_CLUSTER = "demo"  # access-listed: only the built-in user's group may Dial it
SA_CLUSTER = "demo-sa"  # passthrough: the relay admits any token, here the ServiceAccount's
USER = "demo-user"
GROUP = "demo-viewers"
SERVICE_ACCOUNT = "demo-sa"
# cluster -> (namespace, release) of its agent chart
RELEASES = {USER_CLUSTER: ("clusterconnect", "clusterconnect"), SA_CLUSTER: ("clusterconnect-sa", "clusterconnect-sa")}

HELLO_LOOP = "while true; do echo hello from $HOSTNAME; sleep 5; done"


def kubectl(kubeconfig: Path, *args: str, input: str | None = None) -> str:
    result = subprocess.run([KUBECTL, "--kubeconfig", str(kubeconfig), *args], input=input,
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"error: kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def run_shown(argv: list[str], input: str | None = None, shown_output: str | None = None) -> str:
    """Run a command and print it (and its output, or ``shown_output`` instead) as the user would type it."""
    print(f"\n$ {shlex.join(argv)}", flush=True)
    result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"error: {os.path.basename(argv[0])} {' '.join(argv[1:3])}: {result.stderr.strip()}")
    print((shown_output if shown_output is not None else result.stdout).rstrip(), flush=True)
    return result.stdout


def write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return path


def demo_workload(admin: Path, state: Path) -> Path:
    """The demo namespace, its pods and the ServiceAccount of the passthrough path; returns that SA's token file."""
    kubectl(admin, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": SERVICE_ACCOUNT, "namespace": NAMESPACE}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "clusterconnect-demo-sa"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
         "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}]},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "hello", "namespace": NAMESPACE},
         "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "hello"}},
                  "template": {"metadata": {"labels": {"app": "hello"}},
                               "spec": {"containers": [{"name": "hello", "image": "local",
                                                        "command": ["sh", "-c", HELLO_LOOP]}]}}}},
    ]}))
    token = kubectl(admin, "create", "token", SERVICE_ACCOUNT, "-n", NAMESPACE, "--duration=24h").strip()
    return write_private(state / f"{SERVICE_ACCOUNT}.token", token)


def run_streamed(argv: list[str]) -> None:
    """Run a command as the user would type it, its output shown as it comes (connect's progress lines)."""
    print(f"\n$ {shlex.join(argv)}", flush=True)
    if subprocess.run(argv, timeout=600).returncode != 0:
        raise SystemExit(f"error: {os.path.basename(argv[0])} {' '.join(argv[1:3])} failed (its error is above)")


def connect(chain: Chain, admin: Path, state: Path, cluster: str, authentication_config: Path) -> None:
    """`clusterconnect connect CLUSTER`, with what the devcluster needs: a hostPath volume for the agent's
    state claim and one auth proxy on a port of its own (deploy/local/agent_chart.py)."""
    namespace, release = RELEASES[cluster]
    kubectl(admin, "apply", "-f", "-", input=json.dumps(state_volume(namespace, release, state / "volumes" / cluster)))
    values = state / f"{cluster}-devcluster-values.yaml"
    values.write_text(yaml.safe_dump(devcluster_values(free_port())))
    run_streamed([script("clusterconnect"), "connect", cluster, "--kubeconfig", str(admin), *admin_flags(chain),
                  "--namespace", namespace, "--release", release, "--authentication-config", str(authentication_config),
                  "--values", str(values), "--helm", str(HELM), "--kubectl", KUBECTL])


def admin_flags(chain: Chain) -> list[str]:
    return ["--relay", chain.relay_url, "--relay-ca", str(chain.relay_ca),
            "--admin-credential", str(chain.admin_credential)]


def write_pids(state: Path, devcluster: subprocess.Popen, chain: Chain | None) -> None:
    processes = chain.processes.values() if chain else ()
    (state / "pids").write_text("\n".join([str(devcluster.pid), *(str(p.popen.pid) for p in processes)]) + "\n")


def write_endpoints(state: Path, chain: Chain) -> Path:
    """STATE/endpoints.json: each service running here (the relay, the client proxies), its name, pid and
    metrics URL (/metrics; /healthz and /readyz beside it), for a scraper or a look with curl. (The agents
    and auth proxies are pods of the devcluster: not listed yet.)"""
    path = state / "endpoints.json"
    path.write_text(json.dumps(chain.endpoints(), indent=2) + "\n")
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
    write_pids(state, devcluster, None)
    sa_token = demo_workload(admin, state)
    authentication_config = state / "authentication.yaml"
    chain = Chain(state, Path("/nonexistent"), cluster=USER_CLUSTER)  # the agents and auth proxies are pods
    user_state = state / "user"
    kubeconfig, kubeconfig_sa = state / "kubeconfig", state / "kubeconfig-sa"
    clusterconnect = script("clusterconnect")
    print("starting the relay ...", flush=True)
    try:
        chain.start_relay()
        write_pids(state, devcluster, chain)
        # the auth proxies trust the relay's built-in issuer like any OIDC issuer; ServiceAccount tokens pass through
        write_authentication_config(authentication_config, builtin_issuer(chain))
        print(f"\nConnecting the devcluster as {USER_CLUSTER} and as {SA_CLUSTER}: each registers it at the relay"
              " and installs the agent chart (agent + auth proxy pods) with helm:", flush=True)
        connect(chain, admin, state, USER_CLUSTER, authentication_config)
        connect(chain, admin, state, SA_CLUSTER, authentication_config)
        run_shown([KUBECTL, "--kubeconfig", str(admin), "get", "pods", "-n", RELEASES[USER_CLUSTER][0]])

        print(f"\nA built-in user of the relay, {USER} (group {GROUP}), who may reach cluster {USER_CLUSTER}:",
              flush=True)
        added = subprocess.run([clusterconnect, "users", "add", USER, "--group", GROUP, *admin_flags(chain)],
                               capture_output=True, text=True, timeout=30)
        if added.returncode != 0:
            raise SystemExit(f"error: clusterconnect users add: {added.stderr.strip()}")
        code = added.stdout.splitlines()[1].strip()
        # the code is spent by the login below; still, it is a credential until then and stays off the screen
        print(f"\n$ {shlex.join([clusterconnect, 'users', 'add', USER, '--group', GROUP, *admin_flags(chain)])}")
        print(added.stdout.replace(code, "<one-time login code>").rstrip(), flush=True)
        run_shown([clusterconnect, "login", "--relay", chain.relay_url, "--relay-ca", str(chain.relay_ca),
                   "--code", "-", "--state-dir", str(user_state)], input=code + "\n")
        print("(the code was typed on stdin)", flush=True)
        run_shown([clusterconnect, "clusters", "grant", USER_CLUSTER, "--group", GROUP, *admin_flags(chain)])
        # the cluster's RBAC decides what the impersonated user may do: view, in the demo namespace only
        run_shown([KUBECTL, "--kubeconfig", str(admin), "create", "rolebinding", f"{GROUP}-view",
                   "-n", NAMESPACE, "--clusterrole", "view", "--group", GROUP])

        _, ready = chain.start_proxy(None, kubeconfig, state_dir=user_state, cluster=USER_CLUSTER)
        print(f"\nclient proxy for {USER} ({USER_CLUSTER}): {ready}", flush=True)
        _, ready_sa = chain.start_proxy(sa_token, kubeconfig_sa, name="proxy-sa", cluster=SA_CLUSTER,
                                        state_dir=state / "proxy-sa-state")
        print(f"client proxy for the ServiceAccount ({SA_CLUSTER}): {ready_sa}", flush=True)
    finally:
        write_pids(state, devcluster, chain)
        write_endpoints(state, chain)
    wait_until(lambda: kubectl(admin, "get", "pods", "-n", NAMESPACE, "-o", "name").count("pod/") >= 2,
               60, "the demo pods")
    for args in (["auth", "whoami"], ["get", "pods", "-n", NAMESPACE]):
        print(f"\n$ KUBECONFIG={kubeconfig} kubectl {shlex.join(args)}    # as {USER}, through the tunnel",
              flush=True)
        print(kubectl(kubeconfig, *args).rstrip(), flush=True)
    for args in (["auth", "whoami"], ["get", "pods", "-A"]):
        print(f"\n$ KUBECONFIG={kubeconfig_sa} kubectl {shlex.join(args)}    # as the ServiceAccount",
              flush=True)
        print(kubectl(kubeconfig_sa, *args).rstrip(), flush=True)
    release_list = "releases " + ", ".join(f"{ns}/{r}" for ns, r in RELEASES.values())
    print(f"""
The relay and the client proxies run in the background (logs in {state}/logs); the agents and auth proxies
are pods of the devcluster, installed by `clusterconnect connect` ({release_list}).
{kubeconfig}: {USER}, a built-in user (kubectl gets its tokens from `clusterconnect token`); the relay
  admits it to cluster {USER_CLUSTER} (access list: group {GROUP}) and the auth proxy impersonates it, so
  RBAC lets it view namespace {NAMESPACE} and nothing else.
{kubeconfig_sa}: ServiceAccount {NAMESPACE}/{SERVICE_ACCOUNT} (cluster-admin), its token passed through
  untouched; cluster {SA_CLUSTER} has no access list, since the relay admits only its users' tokens to one that has.
Try:
  export KUBECONFIG={kubeconfig}
  kubectl auth whoami
  kubectl get pods -n {NAMESPACE}
  kubectl logs -f -n {NAMESPACE} deploy/hello
  kubectl get pods -A    # Forbidden: {USER} may view {NAMESPACE} only
  KUBECONFIG={kubeconfig_sa} kubectl exec -it -n {NAMESPACE} deploy/hello -- sh
  KUBECONFIG={kubeconfig_sa} kubectl get pods -n {RELEASES[USER_CLUSTER][0]}    # the agent and auth proxy pods
  {shlex.join([clusterconnect, "clusters", "list", *admin_flags(chain)])}
Stop everything with: make demo-down""")


def down(state: Path, quiet: bool = False) -> None:
    pids_file = state / "pids"
    if not pids_file.exists():
        if not quiet:
            print("nothing to stop")
        return
    pids = [int(p) for p in pids_file.read_text().split()]
    # One at a time, the last started first (client proxies, agents, auth proxy, relay), as the tests'
    # Chain.stop_all does: a relay stopped while its agents hang up at the same moment logs grpc's
    # CancelledError traceback (a race of the relay's shutdown, not fixed yet).
    for pid in reversed(pids):
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 10
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
    except SystemExit:  # a step that failed (its one line is the exit message): leave no process behind
        if args.action == "up":
            down(args.state_dir.resolve(), quiet=True)
        raise


if __name__ == "__main__":
    main()
