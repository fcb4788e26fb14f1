"""`make demo` end to end: deploy/local/demo.py up starts its own devcluster and a relay, onboards the
devcluster with `clusterconnect connect` (agent and auth proxy as pods of the chart), shows kubectl run as a
built-in user through impersonation (STATE/kubeconfig) and as a ServiceAccount passed through
(STATE/kubeconfig-sa); `down` leaves no process, the pods' included. The apiserver's audit log judges who
each request was."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
from chain import wait_until
from devcluster.fixture import DevCluster

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "deploy" / "local" / "demo.py"
NAMESPACE = "clusterconnect-demo"
# the auth proxy of the chart `clusterconnect connect demo` installed (release and namespace clusterconnect)
AUTHPROXY_SA = "system:serviceaccount:clusterconnect:clusterconnect-aadproxy"
DEMO_SA = f"system:serviceaccount:{NAMESPACE}:demo-sa"

pytestmark = pytest.mark.devcluster


def demo(action: str, state: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEMO), action, "--state-dir", str(state)], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)


def kubectl(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["/usr/bin/kubectl", "--kubeconfig", str(kubeconfig), *args], capture_output=True,
                          text=True, timeout=60)


def audited_list(cluster: DevCluster, canary: str) -> dict:
    """The audit event of the pod list whose label selector is canary=``canary``."""
    def find() -> dict | None:
        return next((e for e in cluster.audit_events() if f"canary%3D{canary}" in e.get("requestURI", "")
                     and e.get("stage") == "ResponseComplete"), None)
    return wait_until(find, 20, f"the audit event of {canary}")


def assert_endpoints(state: Path) -> None:
    """STATE/endpoints.json names every service the demo runs on this machine (the relay and the client proxies;
    the agents and auth proxies run as the devcluster's pods) with its pid and a metrics URL that answers."""
    endpoints = json.loads((state / "endpoints.json").read_text())
    assert sorted(e["name"] for e in endpoints) == ["proxy", "proxy-sa", "relay"]
    for endpoint in endpoints:
        assert Path(f"/proc/{endpoint['pid']}").exists(), endpoint
        with urllib.request.urlopen(endpoint["metrics_url"], timeout=10) as answer:
            assert answer.status == 200 and b"process_resident_memory_bytes" in answer.read(), endpoint


def processes_of(state: Path) -> list[str]:
    """Live processes of the demo: their command line names its state directory, or (the pods' processes)
    their working directory is in it."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if str(state) in cmdline or cwd.startswith(str(state) + "/"):
            found.append(f"{entry}: {cmdline}")
    return found


def chart_pods(cluster: DevCluster, namespace: str) -> dict[str, str]:
    """component -> phase of the agent chart's pods in ``namespace``."""
    items = cluster.get_json("pods", "-n", namespace)["items"]
    return {p["metadata"]["labels"].get("app.kubernetes.io/component", "?"): p["status"].get("phase", "")
            for p in items}


def test_demo_runs_kubectl_as_the_builtin_user_and_as_the_service_account_and_down_leaves_no_process(
        tmp_path_factory):
    state = tmp_path_factory.mktemp("demo")
    try:
        up = demo("up", state)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        out = up.stdout
        # the commands that did it are shown; the one-time login code is not
        for command in ("clusterconnect users add demo-user --group demo-viewers", "clusterconnect login --relay",
                        "--code - --state-dir", "clusterconnect clusters grant demo --group demo-viewers"):
            assert command in out, out
        assert "<one-time login code>" in out
        # onboarded with `clusterconnect connect`: agent and auth proxy are pods the chart installed
        for cluster_name in ("demo", "demo-sa"):
            assert f"clusterconnect connect {cluster_name} --kubeconfig" in out, out
            assert f"cluster {cluster_name} connected in" in out, out
        assert "Username    demo-user" in out and DEMO_SA in out, out

        user_kubeconfig, sa_kubeconfig = state / "kubeconfig", state / "kubeconfig-sa"
        whoami = kubectl(user_kubeconfig, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
        assert whoami.stdout == "demo-user", whoami.stderr
        whoami_sa = kubectl(sa_kubeconfig, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
        assert whoami_sa.stdout == DEMO_SA, whoami_sa.stderr

        cluster = DevCluster(state / "devcluster")
        for namespace in ("clusterconnect", "clusterconnect-sa"):
            assert chart_pods(cluster, namespace) == {"agent": "Running", "auth-proxy": "Running"}
        pod_processes = [p for p in processes_of(state)
                         if "clusterconnect-agent" in p or "clusterconnect-aadproxy" in p]
        assert len(pod_processes) >= 4, processes_of(state)
        canary = uuid.uuid4().hex
        assert kubectl(user_kubeconfig, "get", "pods", "-n", NAMESPACE, "-l", f"canary={canary}").returncode == 0
        event = audited_list(cluster, canary)
        assert event["user"]["username"] == AUTHPROXY_SA, event
        assert event["impersonatedUser"]["username"] == "demo-user", event
        assert "demo-viewers" in event["impersonatedUser"]["groups"], event
        # RBAC of the devcluster decides for the impersonated user: view in the demo namespace only
        assert "Forbidden" in kubectl(user_kubeconfig, "get", "pods", "-A").stderr

        canary_sa = uuid.uuid4().hex
        assert kubectl(sa_kubeconfig, "get", "pods", "-A", "-l", f"canary={canary_sa}").returncode == 0
        event_sa = audited_list(cluster, canary_sa)
        assert event_sa["user"]["username"] == DEMO_SA and "impersonatedUser" not in event_sa, event_sa

        # a printed command works exactly as written
        listing = next(line.strip() for line in out.splitlines() if " clusters list " in line)
        clusters = subprocess.run(shlex.split(listing), capture_output=True, text=True, timeout=30)
        assert clusters.returncode == 0, clusters.stderr
        assert [line.split()[:2] for line in clusters.stdout.splitlines()[1:]] == [
            ["demo", "Connected"], ["demo-sa", "Connected"]]
        assert processes_of(state), "canary: the scan sees the running demo"
        assert_endpoints(state)
    finally:
        down = demo("down", state)
    assert down.returncode == 0 and "demo stopped" in down.stdout, down.stderr
    assert processes_of(state) == []
