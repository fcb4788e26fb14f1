"""The deploy/k8s manifests are accepted by a real apiserver (server-side dry run)."""

from __future__ import annotations

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "k8s"


def test_manifests_pass_server_side_dry_run(devcluster):
    # Server-side dry run needs the namespaces to exist; create them for real, then dry-run the rest.
    for path in (DEPLOY / "namespace.yaml", DEPLOY / "relay.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "Namespace":
                devcluster.kubectl("create", "namespace", doc["metadata"]["name"], check=False)
    manifests = sorted(DEPLOY.glob("*.yaml"))
    assert {p.name for p in manifests} >= {"namespace.yaml", "relay.yaml", "agent.yaml", "aadproxy.yaml"}, manifests
    for path in manifests:
        result = devcluster.kubectl("apply", "--dry-run=server", "-f", str(path))
        assert "(server dry run)" in result.stdout, result.stdout


def test_agent_needs_no_kubernetes_permissions():
    docs = [d for p in DEPLOY.glob("*.yaml") for d in yaml.safe_load_all(p.read_text()) if d]
    bindings = [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    assert "clusterconnect-agent" in accounts, accounts  # the manifests were read: the agent's account is there
    assert not any(s["name"] == "clusterconnect-agent" for b in bindings for s in b.get("subjects", []))
