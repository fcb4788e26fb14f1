"""A real `helm install` of the clusterconnect-agent chart into the devcluster, then upgrade and uninstall.

The agent and the auth proxy run as pods (the node runs the console scripts of this venv; images are
ignored): the auth proxy in OIDC mode trusting the relay's built-in issuer, with its configuration from a
ConfigMap volume, its TLS from a Secret volume, its own token from a projected volume and in-cluster
config; the agent with its identity on a PersistentVolumeClaim (a hostPath PV), the auth proxy's CA from
a Secret volume, reaching the proxy by its Service name. kubectl through the relay (a client proxy, a
ServiceAccount token that the proxy passes through) reaches the cluster through them before, during and
after an upgrade that rolls both; the longest gap is printed and bounded. Uninstall leaves nothing.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import yaml
from agent_chart import devcluster_values
from agent_release import (
    ROOT,
    TunnelLoop,
    cluster_status,
    describe_pods,
    helm_binary,
    pod_processes,
    release_leftovers,
    release_volume,
)
from authentication import builtin_issuer
from chain import Chain, free_port
from waiting import WaitFailed, wait_until

NAMESPACE = "cc-helm"
RELEASE = "cc-helm"
CLUSTER = "helm-dev"
CHART = ROOT / "deploy/helm/clusterconnect-agent"
# The cluster may be unreachable while the agent pod is replaced (Recreate: the old one stops first).
MAX_GAP = 30.0


@pytest.fixture
def release_state(devcluster, tmp_path):
    """The namespace and the agent's state volume; removes both (and what the release left) afterwards."""
    devcluster.create_namespace(NAMESPACE)
    with release_volume(devcluster, NAMESPACE, RELEASE, tmp_path / "agent-state"):
        yield


def helm(devcluster, *args: str, values: dict | None = None) -> str:
    result = subprocess.run(
        [str(helm_binary()), *args, "-n", NAMESPACE, "--kubeconfig", str(devcluster.kubeconfig),
         *(["-f", "-"] if values is not None else [])],
        input=yaml.safe_dump(values) if values is not None else None,
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, f"helm {args[0]}: {result.stderr}"
    return result.stdout


def pods(devcluster, component: str) -> list[dict]:
    return devcluster.get_json("pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/component={component}")["items"]


def ready_pods(devcluster, component: str) -> list[str] | None:
    """UIDs of the component's pods once every one of them is Ready (and none is terminating)."""
    items = pods(devcluster, component)
    if not items or any(p["metadata"].get("deletionTimestamp") for p in items):
        return None
    for pod in items:
        conditions = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
        if conditions.get("Ready") != "True":
            return None
    return sorted(p["metadata"]["uid"] for p in items)


def pod_log_events(devcluster, component: str) -> list[dict]:
    name = pods(devcluster, component)[0]["metadata"]["name"]
    lines = devcluster.kubectl("logs", "-n", NAMESPACE, name).stdout.splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_helm_install_upgrade_uninstall(devcluster, admin_sa_token, release_state, tmp_path):
    chain = Chain(tmp_path / "chain", tmp_path / "no-kubeconfig", cluster=CLUSTER)
    try:
        install_upgrade_uninstall(devcluster, admin_sa_token, chain, tmp_path)
    except WaitFailed as exc:
        raise WaitFailed(f"{exc}\n{describe_pods(devcluster, NAMESPACE)}") from None
    finally:
        chain.stop_all()


def install_upgrade_uninstall(devcluster, admin_sa_token, chain: Chain, tmp_path) -> None:
    chain.start_relay()
    join = chain.add_cluster()
    port = free_port()
    values = {
        **devcluster_values(port),
        "cluster": CLUSTER,
        "agent": {"relay": chain.relay_url, "join": {"token": join["join_token"],
                                                      "relayCAHash": join["relay_ca_hash"]}},
    }
    values["authProxy"].update({
        "tls": {"generate": True},
        "authentication": {"apiVersion": "apiserver.config.k8s.io/v1", "kind": "AuthenticationConfiguration",
                           "jwt": [builtin_issuer(chain)]},
    })
    helm(devcluster, "install", RELEASE, str(CHART), values=values)

    agent_pods = wait_until(lambda: ready_pods(devcluster, "agent"), 90, "the agent pod to be Ready")
    proxy_pods = wait_until(lambda: ready_pods(devcluster, "auth-proxy"), 180, "the auth proxy pod to be Ready")
    assert cluster_status(chain, CLUSTER) == "Connected"
    # in-cluster config, its own token (projected volume) and the ConfigMap's issuers: OIDC mode came up
    events = {e["event"]: e for e in pod_log_events(devcluster, "auth-proxy")}
    assert events["listening"]["authentication"] == "oidc"
    assert events["listening"]["tls"] is True
    assert events["listening"]["address"].endswith(f":{port}")
    assert events["listening"]["apiserver"] == devcluster.server.removeprefix("https://")
    assert events["oidc authentication"]["issuers"] == [chain.issuer_url]
    # the agent joined with the Secret's token and keeps its identity on the claim's volume
    assert any(e["event"] == "connected to relay" for e in pod_log_events(devcluster, "agent"))
    assert list((tmp_path / "agent-state").rglob("*.crt")), "the agent's state is on the PersistentVolume"
    assert len(pod_processes(devcluster, NAMESPACE)) >= 2

    kubeconfig = tmp_path / "kubeconfig"
    chain.start_proxy(admin_sa_token, kubeconfig, cluster=CLUSTER)
    with TunnelLoop(kubeconfig) as loop:
        wait_until(lambda: loop.successes_since(0) >= 3, 60, "kubectl through the tunnel before the upgrade")
        upgraded = time.monotonic()
        new_port = free_port()
        # a new auth proxy port rolls both: the proxy's pod and, through its address, the agent's; and a new
        # metrics port, since the new proxy pod starts beside the old one on the devcluster's host network
        helm(devcluster, "upgrade", RELEASE, str(CHART), "--reuse-values",
             values={"authProxy": {"port": new_port, "metricsPort": free_port()}})
        new_agents = wait_until(lambda: (p := ready_pods(devcluster, "agent")) and p != agent_pods and p,
                                180, "the agent pod to be replaced")
        new_proxies = wait_until(lambda: (p := ready_pods(devcluster, "auth-proxy")) and p != proxy_pods and p,
                                 180, "the auth proxy pod to be replaced")
        assert not set(new_agents) & set(agent_pods) and not set(new_proxies) & set(proxy_pods)
        settled = time.monotonic()
        wait_until(lambda: loop.successes_since(settled) >= 5, 60, "kubectl through the tunnel after the upgrade")
    gap = loop.longest_gap()
    print(f"\nhelm upgrade: longest gap without a successful kubectl through the tunnel {gap:.2f}s"
          f" ({loop.failures()} failed of {len(loop.results)} requests, rollout took"
          f" {settled - upgraded:.1f}s)")
    assert loop.successes_since(upgraded) > 5
    assert gap < MAX_GAP, f"the cluster was unreachable for {gap:.1f}s during the upgrade"
    events = {e["event"]: e for e in pod_log_events(devcluster, "auth-proxy")}
    assert events["listening"]["address"].endswith(f":{new_port}")

    helm(devcluster, "uninstall", RELEASE, "--wait")
    wait_until(lambda: not pod_processes(devcluster, NAMESPACE), 60, "the release's processes to end")
    wait_until(lambda: not pods(devcluster, "agent") and not pods(devcluster, "auth-proxy"), 60,
               "the release's pods to go")
    # only the agent's state claim stays, by design (helm.sh/resource-policy: keep)
    assert release_leftovers(devcluster, NAMESPACE, RELEASE) == [f"persistentvolumeclaim/{RELEASE}-agent-state"]
    devcluster.kubectl("delete", "pvc", f"{RELEASE}-agent-state", "-n", NAMESPACE)
    assert release_leftovers(devcluster, NAMESPACE, RELEASE) == []
    wait_until(lambda: cluster_status(chain, CLUSTER) == "Disconnected", 30, "the relay to see the agent go")
