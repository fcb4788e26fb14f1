"""An installed clusterconnect-agent release on the devcluster, as the tests look at it: its pods' processes,
the objects it left, whether the relay sees its agent, and kubectl through the tunnel in a loop."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from agent_chart import state_volume

ROOT = Path(__file__).resolve().parent.parent
HELM = ROOT / "tools/helm/bin/helm"
KUBECTL = "/usr/bin/kubectl"
# Namespaced kinds a release of the chart makes (plus its helm release Secrets, labelled owner=helm).
NAMESPACED = "pods,deployments,replicasets,services,secrets,configmaps,serviceaccounts,poddisruptionbudgets"


def helm_binary() -> Path:
    """helm from its Go module (`make helm`; a no-op when up to date)."""
    subprocess.run(["make", "--no-print-directory", "-s", "-C", str(ROOT / "tools/helm")], check=True)
    return HELM


@contextmanager
def release_volume(devcluster, namespace: str, release: str, state_dir: Path) -> Iterator[None]:
    """The agent's state volume of ``release`` bound ahead; afterwards the release uninstalled and its
    namespace and volume deleted, however the test ended."""
    pv = state_volume(namespace, release, state_dir)
    devcluster.apply(pv)
    try:
        yield
    finally:
        subprocess.run([str(helm_binary()), "uninstall", release, "-n", namespace,
                        "--kubeconfig", str(devcluster.kubeconfig), "--wait"],
                       capture_output=True, check=False, timeout=180)
        devcluster.kubectl("delete", "namespace", namespace, "--ignore-not-found", "--wait=true", "--timeout=120s",
                           check=False, timeout=150)
        devcluster.kubectl("delete", "pv", pv["metadata"]["name"], "--ignore-not-found", check=False)


def pod_processes(devcluster, namespace: str) -> list[int]:
    """Processes run by the node for pods of ``namespace`` (their cwd is the pod's directory)."""
    prefix = str((devcluster.state_dir / "pods").resolve() / f"{namespace}_")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/cwd").startswith(prefix):
                found.append(int(entry))
        except OSError:
            continue
    return found


def release_leftovers(devcluster, namespace: str, release: str) -> list[str]:
    """Every object of the release still there: labelled with it, its helm records, its cluster roles."""
    names = devcluster.kubectl("get", NAMESPACED, "-n", namespace, "-o", "name",
                               "-l", f"app.kubernetes.io/instance={release}").stdout.split()
    names += devcluster.kubectl("get", "secrets", "-n", namespace, "-o", "name",
                                "-l", f"owner=helm,name={release}").stdout.split()
    names += devcluster.kubectl("get", "clusterroles,clusterrolebindings", "-o", "name",
                                "-l", f"app.kubernetes.io/instance={release}").stdout.split()
    names += devcluster.kubectl("get", "persistentvolumeclaims", "-n", namespace, "-o", "name").stdout.split()
    return names


def cluster_status(chain, name: str) -> str | None:
    """The relay's STATUS column for cluster ``name`` (`clusterconnect clusters list`), or None."""
    for line in chain.admin("list").stdout.splitlines():
        cells = line.split()
        if cells and cells[0] == name:
            return cells[1]
    return None


@dataclass
class TunnelLoop:
    """kubectl through the tunnel over and over (a thread), to measure how long the cluster was unreachable."""

    kubeconfig: Path
    results: list[tuple[float, float, bool]] = field(default_factory=list)  # (start, end, ok), monotonic
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            result = subprocess.run([KUBECTL, "--kubeconfig", str(self.kubeconfig), "--request-timeout=5s",
                                     "get", "namespace", "default", "-o", "name"],
                                    capture_output=True, text=True, check=False)
            self.results.append((start, time.monotonic(),
                                 result.returncode == 0 and result.stdout.strip() == "namespace/default"))

    def __enter__(self) -> TunnelLoop:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)

    def successes_since(self, moment: float) -> int:
        return sum(1 for start, _, ok in self.results if ok and start >= moment)

    def longest_gap(self) -> float:
        """The longest time between two successive successful requests' ends (0 without a failure)."""
        ends = [end for _, end, ok in self.results if ok]
        return max((b - a for a, b in zip(ends, ends[1:], strict=False)), default=0.0)

    def failures(self) -> int:
        return sum(1 for _, _, ok in self.results if not ok)


def describe_pods(devcluster, namespace: str) -> str:
    """The pods of ``namespace``, their container states and log tails: what a failed wait shows."""
    parts = [devcluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout]
    for pod in devcluster.get_json("pods", "-n", namespace)["items"]:
        name = pod["metadata"]["name"]
        parts.append(f"--- {name}: {pod.get('status', {}).get('containerStatuses')}")
        for previous in ("--previous=true", "--previous=false"):
            logs = devcluster.kubectl("logs", "-n", namespace, name, "--tail=15", previous, check=False)
            parts.append(logs.stdout + logs.stderr)
    return "\n".join(parts)
