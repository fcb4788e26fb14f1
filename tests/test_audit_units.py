"""The auth proxy's audit events (aadproxy/audit.py, request_info.py): pure parts and the file sink."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest
import structlog
from chain import script

from clusterconnect.aadproxy.audit import (
    WRITE_FAILURES,
    AuditLog,
    ConnectionFacts,
    RequestRecord,
    audit_event,
    peer_ip,
    rfc3339_micro,
    safe_request_uri,
)
from clusterconnect.aadproxy.authn import Subject
from clusterconnect.aadproxy.request_info import RequestInfo, request_info
from clusterconnect.errors import StartupError


def info(verb: str, group: str = "", version: str = "v1", namespace: str = "", resource: str = "", name: str = "",
         subresource: str = "") -> RequestInfo:
    return RequestInfo(verb, True, group, version, namespace, resource, name, subresource)


@pytest.mark.parametrize(("method", "target", "expected"), [
    # the verbs, as the apiserver derives them
    ("GET", "/api/v1/namespaces/ns/pods", info("list", namespace="ns", resource="pods")),
    ("GET", "/api/v1/namespaces/ns/pods?limit=500", info("list", namespace="ns", resource="pods")),
    ("GET", "/api/v1/namespaces/ns/pods?watch=true&resourceVersion=1", info("watch", namespace="ns", resource="pods")),
    ("GET", "/api/v1/pods?watch=1", info("watch", resource="pods")),
    ("GET", "/api/v1/pods?watch=", info("watch", resource="pods")),  # the codec: anything but 0/false
    ("GET", "/api/v1/pods?watch=False", info("list", resource="pods")),
    ("GET", "/api/v1/pods?watch=0", info("list", resource="pods")),
    ("GET", "/api/v1/namespaces/ns/pods/p", info("get", namespace="ns", resource="pods", name="p")),
    ("HEAD", "/api/v1/namespaces/ns/pods/p", info("get", namespace="ns", resource="pods", name="p")),
    ("POST", "/api/v1/namespaces/ns/pods", info("create", namespace="ns", resource="pods")),
    ("PUT", "/api/v1/namespaces/ns/pods/p", info("update", namespace="ns", resource="pods", name="p")),
    ("PATCH", "/api/v1/namespaces/ns/pods/p", info("patch", namespace="ns", resource="pods", name="p")),
    ("DELETE", "/api/v1/namespaces/ns/pods/p", info("delete", namespace="ns", resource="pods", name="p")),
    ("DELETE", "/api/v1/namespaces/ns/pods", info("deletecollection", namespace="ns", resource="pods")),
    ("OPTIONS", "/api/v1/namespaces/ns/pods/p", info("", namespace="ns", resource="pods", name="p")),
    # groups, subresources, cluster-scoped, namespaces themselves
    ("GET", "/apis/apps/v1/namespaces/ns/deployments/d/scale",
     info("get", "apps", namespace="ns", resource="deployments", name="d", subresource="scale")),
    ("POST", "/api/v1/namespaces/ns/pods/p/exec?command=ls",
     info("create", namespace="ns", resource="pods", name="p", subresource="exec")),
    ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles",
     info("list", "rbac.authorization.k8s.io", resource="clusterroles")),
    ("GET", "/api/v1/namespaces/ns", info("get", namespace="ns", resource="namespaces", name="ns")),
    ("PUT", "/api/v1/namespaces/ns/finalize",
     info("update", namespace="ns", resource="namespaces", name="ns", subresource="finalize")),
    ("GET", "/api/v1/namespaces", info("list", resource="namespaces")),
    ("GET", "/api/v1/nodes/n1/proxy/metrics", info("get", resource="nodes", name="n1", subresource="proxy")),
    # the legacy verb prefixes
    ("GET", "/api/v1/watch/namespaces/ns/pods", info("watch", namespace="ns", resource="pods")),
    ("GET", "/api/v1/proxy/namespaces/ns/pods/p/x/y", info("proxy", namespace="ns", resource="pods", name="p")),
    # a list of one name, by field selector; an invalid name is not taken
    ("GET", "/api/v1/namespaces/ns/pods?fieldSelector=metadata.name%3Dweb",
     info("list", namespace="ns", resource="pods", name="web")),
    ("GET", "/api/v1/namespaces/ns/pods?fieldSelector=status.phase%3DRunning,metadata.name%3D%3Dweb",
     info("list", namespace="ns", resource="pods", name="web")),
    ("GET", "/api/v1/namespaces/ns/pods?fieldSelector=metadata.name%21%3Dweb",
     info("list", namespace="ns", resource="pods")),
    ("GET", "/api/v1/namespaces/ns/pods?fieldSelector=metadata.name%3D..",
     info("list", namespace="ns", resource="pods")),
    # escaped segments are read decoded, as the apiserver reads URL.Path
    ("GET", "/api/v1/namespaces/ns/configmaps/a%3Ab", info("get", namespace="ns", resource="configmaps", name="a:b")),
])
def test_resource_requests(method, target, expected):
    assert request_info(method, target) == expected


@pytest.mark.parametrize(("method", "target"), [
    ("GET", "/version"), ("GET", "/healthz?verbose"), ("GET", "/api"), ("GET", "/api/v1"), ("GET", "/apis"),
    ("GET", "/apis/apps"), ("GET", "/apis/apps/v1"), ("POST", "/openapi/v3"), ("GET", "/"), ("GET", ""),
    ("GET", "/api/v1/watch"),
])
def test_non_resource_requests_have_the_method_as_verb(method, target):
    assert request_info(method, target) == RequestInfo(method.lower())


def test_request_uri_keeps_the_query_but_no_credential_looking_value():
    assert safe_request_uri("/api/v1/pods") == "/api/v1/pods"
    assert safe_request_uri("/api/v1/pods?limit=5&watch=1") == "/api/v1/pods?limit=5&watch=1"
    assert safe_request_uri("/x?access_token=abc&a=1&Authorization=Bearer%20x&id_token") == \
        "/x?access_token=%5Bredacted%5D&a=1&Authorization=%5Bredacted%5D&id_token"


def test_peer_ip():
    assert peer_ip("ipv4:10.0.0.7:51234") == "10.0.0.7"
    assert peer_ip("ipv6:[::1]:5") == "::1"
    assert peer_ip("ipv6:%5B::1%5D:5") is not None  # whatever grpc spells, nothing raises
    assert peer_ip("unix:/tmp/s") is None and peer_ip("") is None


def test_rfc3339_micro():
    assert rfc3339_micro(0.25) == "1970-01-01T00:00:00.250000Z"


ALICE = Subject("oidc:alice", ("dev", "ops"))


def test_an_impersonated_request_event_has_the_apiserver_shape():
    record = RequestRecord("GET", "/api/v1/namespaces/ns/pods?limit=500", 200, 100.0, 100.0123456,
                           user=ALICE, impersonated=Subject("bob"), authentication="oidc")
    event = audit_event(record, ConnectionFacts("dev", "ab" * 16, ("10.0.0.7",)), "id-1")
    assert event == {
        "kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "Metadata", "auditID": "id-1",
        "stage": "ResponseComplete", "requestURI": "/api/v1/namespaces/ns/pods?limit=500", "verb": "list",
        "user": {"username": "oidc:alice", "groups": ["dev", "ops"]}, "impersonatedUser": {"username": "bob"},
        "sourceIPs": ["10.0.0.7"],
        "objectRef": {"resource": "pods", "namespace": "ns", "apiVersion": "v1"},
        "responseStatus": {"metadata": {}, "code": 200},
        "requestReceivedTimestamp": "1970-01-01T00:01:40.000000Z",
        "stageTimestamp": "1970-01-01T00:01:40.012346Z",
        "annotations": {"clusterconnect.io/authentication": "oidc", "clusterconnect.io/latency": "12.346ms",
                        "clusterconnect.io/trace-id": "ab" * 16, "clusterconnect.io/cluster": "dev"},
    }


def test_a_refused_or_passed_through_request_names_no_impersonation():
    refused = audit_event(RequestRecord("DELETE", "/apis/apps/v1/namespaces/ns/deployments/d", 403, 1.0, 1.0,
                                        user=ALICE, authentication="rejected", reason="connection-identity"),
                          ConnectionFacts(), "id-2")
    assert refused["user"] == {"username": "oidc:alice", "groups": ["dev", "ops"]}
    assert "impersonatedUser" not in refused and "sourceIPs" not in refused
    assert refused["objectRef"] == {"resource": "deployments", "namespace": "ns", "name": "d", "apiGroup": "apps",
                                    "apiVersion": "v1"}
    assert refused["annotations"]["clusterconnect.io/reason"] == "connection-identity"
    assert refused["verb"] == "delete" and refused["responseStatus"]["code"] == 403
    passed = audit_event(RequestRecord("GET", "/version", 0, 1.0, 2.0), ConnectionFacts(), "id-3")
    assert passed["user"] == {} and "objectRef" not in passed and passed["verb"] == "get"
    assert passed["responseStatus"] == {"metadata": {}, "code": 0}
    assert passed["annotations"] == {"clusterconnect.io/authentication": "passthrough",
                                     "clusterconnect.io/latency": "1000.000ms"}


def test_the_file_is_appended_and_created_0600(tmp_path):
    path = tmp_path / "audit.log"
    path.write_text('{"earlier": 1}\n')
    os.chmod(path, 0o640)
    sink = AuditLog.open(str(path))
    sink.write({"a": 1})
    sink.close()
    assert path.read_text().splitlines() == ['{"earlier": 1}', '{"a":1}']
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # an existing file keeps the mode its owner gave it
    fresh = tmp_path / "new.log"
    sink = AuditLog.open(str(fresh))
    sink.write({"b": "é"})
    sink.write({"c": 2})
    sink.close()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    assert [json.loads(line) for line in fresh.read_text().splitlines()] == [{"b": "é"}, {"c": 2}]


def test_a_file_that_cannot_be_opened_is_a_one_line_startup_error(tmp_path):
    with pytest.raises(StartupError, match=r"^cannot open --audit-log .*/missing/audit.log: No such file"):
        AuditLog.open(str(tmp_path / "missing" / "audit.log"))


def test_a_write_failure_is_logged_once_counted_and_never_raised():
    before = WRITE_FAILURES._value.get()
    sink = AuditLog.open("/dev/full")  # every write: ENOSPC
    with structlog.testing.capture_logs() as logged:
        for _ in range(3):
            sink.write({"a": 1})
    sink.close()
    assert WRITE_FAILURES._value.get() - before == 3
    assert [(e["event"], e["audit_log"], e["error"]) for e in logged] == [
        ("audit log write failed (further failures are only counted)", "/dev/full", "No space left on device")]


def test_the_auth_proxy_refuses_to_start_with_an_audit_log_it_cannot_open(tmp_path):
    missing = tmp_path / "missing" / "audit.log"
    started = subprocess.run([script("clusterconnect-aadproxy"), "--audit-log", str(missing), "--metrics-listen", ""],
                             capture_output=True, text=True, timeout=30)
    assert started.returncode == 2, started.stderr
    assert started.stderr == f"error: cannot open --audit-log {missing}: No such file or directory\n"
