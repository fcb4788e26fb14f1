"""The auth proxy's audit log (--audit-log FILE, docs/audit.md) with real processes.

A relay, an auth proxy in OIDC mode (impersonation) writing its audit log to a file, an agent, a client
proxy logged in as alice, and /usr/bin/kubectl through it: each request is one audit.k8s.io/v1 Event
naming the verb, the object, the code, alice as the user and as whom the proxy impersonated her.
"""

from __future__ import annotations

import json
import re
import secrets
import stat

import pytest
from chain import wait_until
from identities import builtin_issuer_chain, grant_role, login_with_code

NS = "audit-log"
PROXY_NS = "clusterconnect-audit-log"
RULES = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
         {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "delete"]}]
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


@pytest.fixture(scope="module")
def setup(devcluster, tmp_path_factory):
    state = tmp_path_factory.mktemp("audit-log")
    devcluster.create_namespace(NS)
    grant_role(devcluster, NS, "audit-log-user", RULES, "audit-log-user", groups=[NS])
    audit_log = state / "audit" / "aadproxy-audit.log"
    audit_log.parent.mkdir()
    with builtin_issuer_chain(devcluster, state, PROXY_NS, authproxy_args=("--audit-log", str(audit_log))) as chain:
        chain.cli("clusters", "grant", chain.cluster, "--group", NS)
        login_with_code(chain, "alice", [NS], state / "alice")
        kubeconfig = state / "alice.kubeconfig"
        chain.start_proxy(None, kubeconfig, name="proxy-alice", state_dir=state / "alice")
        yield type("Setup", (), {"chain": chain, "devcluster": devcluster, "kubeconfig": kubeconfig,
                                 "audit_log": audit_log})


def events(setup) -> list[dict]:
    if not setup.audit_log.exists():
        return []
    return [json.loads(line) for line in setup.audit_log.read_text().splitlines()]


def event_for(setup, verb: str, uri_part: str) -> dict:
    """The one event of ``verb`` whose requestURI contains ``uri_part``, not refused by the proxy (waited
    for: the proxy writes it right after the answer, which kubectl may have read first)."""
    def found() -> list[dict]:
        return [e for e in events(setup) if e["verb"] == verb and uri_part in e["requestURI"]
                and e["annotations"]["clusterconnect.io/authentication"] != "rejected"]

    wait_until(lambda: len(found()) == 1, 10, f"the audit event of {verb} {uri_part}")
    return found()[0]


def test_each_kubectl_request_is_one_kubernetes_audit_event(setup):
    name = "cm-" + secrets.token_hex(4)

    def kubectl(*args: str, check: bool = True):
        return setup.devcluster.kubectl(*args, "-n", NS, user_kubeconfig=setup.kubeconfig, check=check, timeout=60)

    kubectl("get", "pods")
    kubectl("create", "configmap", name, "--from-literal=a=b")
    kubectl("delete", "configmap", name)
    refused = kubectl("get", "pods", "--as", "bob", check=False)  # alice may not impersonate: 403 at the proxy
    assert refused.returncode != 0 and "cannot impersonate" in refused.stderr, refused.stderr

    alice = {"username": "alice", "groups": [NS]}
    listed = event_for(setup, "list", f"/api/v1/namespaces/{NS}/pods?")
    created = event_for(setup, "create", f"/api/v1/namespaces/{NS}/configmaps")
    deleted = event_for(setup, "delete", f"/api/v1/namespaces/{NS}/configmaps/{name}")
    for event, resource, code in ((listed, "pods", 200), (created, "configmaps", 201), (deleted, "configmaps", 200)):
        assert event["kind"] == "Event" and event["apiVersion"] == "audit.k8s.io/v1", event
        assert event["level"] == "Metadata" and event["stage"] == "ResponseComplete", event
        assert event["objectRef"]["resource"] == resource and event["objectRef"]["namespace"] == NS, event
        assert event["objectRef"]["apiVersion"] == "v1" and "apiGroup" not in event["objectRef"], event
        assert event["responseStatus"]["code"] == code, event
        assert event["user"] == alice and event["impersonatedUser"] == alice, event
        assert event["sourceIPs"] == ["127.0.0.1"], event
        annotations = event["annotations"]
        assert annotations["clusterconnect.io/authentication"] == "oidc", event
        assert annotations["clusterconnect.io/cluster"] == "dev", event
        assert re.fullmatch(r"[0-9a-f]{32}", annotations["clusterconnect.io/trace-id"]), event
        assert re.fullmatch(r"\d+\.\d{3}ms", annotations["clusterconnect.io/latency"]), event
        assert event["requestReceivedTimestamp"] <= event["stageTimestamp"], event
    assert "name" not in listed["objectRef"] and "name" not in created["objectRef"]
    assert deleted["objectRef"]["name"] == name

    # The refused impersonation (kubectl's discovery may have been refused too, unless cached): alice is the
    # user, nobody was impersonated, the proxy's reason is named.
    impersonating = [e for e in events(setup) if e["annotations"]["clusterconnect.io/authentication"] == "rejected"]
    assert [e["verb"] for e in impersonating if "/pods" in e["requestURI"]] == ["list"], impersonating
    for event in impersonating:
        assert event["responseStatus"]["code"] == 403 and event["user"] == alice, event
        assert "impersonatedUser" not in event, event
        assert event["annotations"]["clusterconnect.io/reason"] == "impersonation", event

    # Every event has an id of its own; no token, JWT or Authorization value anywhere in the file.
    assert len({e["auditID"] for e in events(setup)}) == len(events(setup))
    text = setup.audit_log.read_text()
    assert not JWT.search(text) and "bearer" not in text.lower()
    assert stat.S_IMODE(setup.audit_log.stat().st_mode) == 0o600
