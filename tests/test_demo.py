"""`make demo` end to end: deploy/local/demo.py up starts its own devcluster and the chain, shows kubectl
run as a built-in user through impersonation (STATE/kubeconfig) and as a ServiceAccount passed through
(STATE/kubeconfig-sa); `down` leaves no process. The apiserver's audit log judges who each request was."""

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
AUTHPROXY_SA = f"system:serviceaccount:{NAMESPACE}:aadproxy"
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
    """STATE/endpoints.json names every service of the demo with its pid and a metrics URL that answers."""
    endpoints = json.loads((state / "endpoints.json").read_text())
    assert sorted(e["name"] for e in endpoints) == ["aadproxy", "agent", "agent-sa", "proxy", "proxy-sa", "relay"]
    for endpoint in endpoints:
        assert Path(f"/proc/{endpoint['pid']}").exists(), endpoint
        with urllib.request.urlopen(endpoint["metrics_url"], timeout=10) as answer:
            assert answer.status == 200 and b"process_resident_memory_bytes" in answer.read(), endpoint


def processes_of(state: Path) -> list[str]:
    """Command lines of live processes that name the demo's state directory (every process of the demo does)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(state) in cmdline:
            found.append(f"{entry}: {cmdline}")
    return found


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
        assert "Username    demo-user" in out and DEMO_SA in out, out

        user_kubeconfig, sa_kubeconfig = state / "kubeconfig", state / "kubeconfig-sa"
        whoami = kubectl(user_kubeconfig, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
        assert whoami.stdout == "demo-user", whoami.stderr
        whoami_sa = kubectl(sa_kubeconfig, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
        assert whoami_sa.stdout == DEMO_SA, whoami_sa.stderr

        cluster = DevCluster(state / "devcluster")
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
