"""`clusterconnect connect` and `disconnect` against the devcluster and a relay started here, as a user runs
them (the console script, helm from tools/helm, /usr/bin/kubectl): connect registers the cluster and
installs the agent chart (agent and auth proxy as pods), again changes nothing, disconnect leaves nothing;
an unreachable cluster is one line and registers nothing."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
import yaml
from agent_chart import devcluster_values
from agent_release import (
    HELM,
    KUBECTL,
    cluster_status,
    helm_binary,
    pod_processes,
    release_leftovers,
    release_volume,
)
from chain import Chain, free_port, script
from waiting import wait_until

NAMESPACE = "cc-connect"
RELEASE = "cc-connect"
CLUSTER = "connect-dev"


@pytest.fixture
def relay(tmp_path):
    chain = Chain(tmp_path / "chain", tmp_path / "no-kubeconfig", cluster=CLUSTER)
    try:
        chain.start_relay()
        yield chain
    finally:
        chain.stop_all()


def clusterconnect(chain: Chain, action: str, kubeconfig: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [script("clusterconnect"), action, CLUSTER, "--kubeconfig", str(kubeconfig),
         "--namespace", NAMESPACE, "--release", RELEASE, "--helm", str(HELM), "--kubectl", KUBECTL,
         "--relay", chain.relay_url, "--relay-ca", str(chain.relay_ca),
         "--admin-credential", str(chain.admin_credential), *extra],
        capture_output=True, text=True, timeout=400,
    )


def release_revision(devcluster) -> str | None:
    out = subprocess.run([str(HELM), "list", "-n", NAMESPACE, "--kubeconfig", str(devcluster.kubeconfig),
                          "--filter", f"^{RELEASE}$", "-o", "yaml"], capture_output=True, text=True, check=True)
    releases = yaml.safe_load(out.stdout) or []
    return str(releases[0]["revision"]) if releases else None


def _devcluster_values(tmp_path: Path) -> Path:
    """The chart's values for the devcluster (free ports)."""
    helm_binary()
    values = tmp_path / "devcluster-values.yaml"
    values.write_text(yaml.safe_dump(devcluster_values(free_port())))
    return values


def test_connect_again_and_disconnect(devcluster, relay, admin_sa_token, tmp_path):
    values = _devcluster_values(tmp_path)
    with release_volume(devcluster, NAMESPACE, RELEASE, tmp_path / "agent-state"):
        first = clusterconnect(relay, "connect", devcluster.kubeconfig, "--values", str(values))
        assert first.returncode == 0, first.stdout + first.stderr
        for progress in ("==> checking the cluster", "==> registering cluster connect-dev at the relay",
                         "==> installing chart clusterconnect-agent as release cc-connect",
                         "==> waiting for the agent to connect", "cluster connect-dev connected in"):
            assert progress in first.stdout, first.stdout
        proxy_line = f"clusterconnect proxy {CLUSTER} --relay {relay.relay_url} --relay-ca {relay.relay_ca}"
        assert proxy_line in first.stdout
        assert cluster_status(relay, CLUSTER) == "Connected"
        # the join token is in the release's Secret, and nowhere in what connect printed
        secret = devcluster.get_json("secret", f"{RELEASE}-agent", "-n", NAMESPACE)
        token = base64.b64decode(secret["data"]["join-token"]).decode()
        assert token and token not in first.stdout + first.stderr
        assert release_revision(devcluster) == "1"

        # kubectl through the relay reaches the cluster through the pods connect installed
        kubeconfig = tmp_path / "kubeconfig"
        relay.start_proxy(admin_sa_token, kubeconfig, cluster=CLUSTER)
        got = subprocess.run([KUBECTL, "--kubeconfig", str(kubeconfig), "get", "namespace", NAMESPACE, "-o", "name"],
                             capture_output=True, text=True, timeout=60)
        assert got.stdout.strip() == f"namespace/{NAMESPACE}", got.stderr

        again = clusterconnect(relay, "connect", devcluster.kubeconfig, "--values", str(values))
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"cluster {CLUSTER} is already connected" in again.stdout and "nothing changed" in again.stdout
        assert "registering" not in again.stdout and "installing" not in again.stdout
        assert release_revision(devcluster) == "1"

        gone = clusterconnect(relay, "disconnect", devcluster.kubeconfig)
        assert gone.returncode == 0, gone.stdout + gone.stderr
        assert f"cluster {CLUSTER} disconnected" in gone.stdout
        assert cluster_status(relay, CLUSTER) is None
        assert release_revision(devcluster) is None
        wait_until(lambda: not pod_processes(devcluster, NAMESPACE), 60, "the release's processes to end")
        wait_until(lambda: release_leftovers(devcluster, NAMESPACE, RELEASE) == [], 60,
                   "the release's objects (and the agent's state claim) to go")


def test_connect_to_an_unreachable_cluster_is_one_line_and_registers_nothing(relay, tmp_path):
    helm_binary()
    kubeconfig = tmp_path / "unreachable.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{free_port()}"}}],
        "users": [{"name": "u", "user": {"token": "x"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}], "current-context": "c",
    }))
    result = clusterconnect(relay, "connect", kubeconfig)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the cluster (kubeconfig "), result.stderr
    assert "connection refused" in lines[0]
    assert cluster_status(relay, CLUSTER) is None


def test_connect_with_the_relay_unreachable_from_the_agent_reports_the_agent_pods_failure(
        devcluster, relay, tmp_path):
    values = _devcluster_values(tmp_path)
    with release_volume(devcluster, NAMESPACE, RELEASE, tmp_path / "agent-state"):
        unreachable = f"https://127.0.0.1:{free_port()}"
        result = clusterconnect(relay, "connect", devcluster.kubeconfig, "--values", str(values),
                                "--agent-relay", unreachable, "--timeout", "25")
        assert result.returncode == 1, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("error: the agent did not connect within 25s: agent pod cc-connect-agent-"), lines
        assert "relay not reachable for enrollment" in lines[0], lines
        # what is left is undone by disconnect
        gone = clusterconnect(relay, "disconnect", devcluster.kubeconfig)
        assert gone.returncode == 0, gone.stdout + gone.stderr
        assert cluster_status(relay, CLUSTER) is None
        wait_until(lambda: not pod_processes(devcluster, NAMESPACE), 60, "the release's processes to end")
