"""Unit tests of pure logic: no sockets, no processes."""

from __future__ import annotations

import asyncio
import json
import random
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import h11
import pytest
import yaml

from clusterconnect.agent.backoff import Backoff
from clusterconnect.clientproxy import kubeconfig
from clusterconnect.dial_refusals import Refused, describe_rpc_error, error_response
from clusterconnect.grpc_options import bearer_from_metadata, grpc_target
from clusterconnect.humanize import ago
from clusterconnect.metadata import DialRefusal
from clusterconnect.pki import KeyPair, ca_hash, create_ca, ensure_ca_and_server_cert
from clusterconnect.relay.storage.clusters import AlreadyExists, ClusterStore, InvalidName
from clusterconnect.relay.storage.kv import SqliteKV
from clusterconnect.relay.storage.store import Store

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("proto", sorted(p.stem for p in (ROOT / "protos/clusterconnect/v1").glob("*.proto")))
def test_committed_stubs_match_the_protos(tmp_path, proto):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                    str(ROOT / f"protos/clusterconnect/v1/{proto}.proto")], check=True)
    for name in (f"{proto}_pb2.py", f"{proto}_pb2.pyi", f"{proto}_pb2_grpc.py"):
        generated = (tmp_path / "clusterconnect/v1" / name).read_text()
        committed = (ROOT / "protos/clusterconnect/v1" / name).read_text()
        assert generated == committed, f"{name} is stale: run `make protos`"


def test_backoff_grows_with_jitter_and_caps_at_30s():
    backoff = Backoff(rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(20)]
    assert all(0 < d <= 30 for d in delays)
    assert max(delays[-5:]) > 10  # it did grow
    assert len(set(delays)) == len(delays)  # jittered
    backoff.reset()
    assert backoff.next_delay() <= 0.5


@pytest.mark.parametrize("url,target", [
    ("https://relay.example.com:8443", "relay.example.com:8443"),
    ("relay.example.com:9000", "relay.example.com:9000"),
    ("https://relay.example.com", "relay.example.com:443"),
    ("https://[::1]:8443", "[::1]:8443"),
])
def test_grpc_target(url, target):
    assert grpc_target(url) == target


@pytest.mark.parametrize("metadata,token", [
    ((("authorization", "Bearer abc"),), "abc"),
    ((("authorization", "bearer abc "),), "abc"),
    ((("authorization", "Basic abc"),), None),
    ((("authorization", "Bearer "),), None),
    ((("authorization", "Bearer a"), ("authorization", "Bearer b")), None),
    ((), None),
])
def test_bearer_from_metadata(metadata, token):
    assert bearer_from_metadata(metadata) == token


def test_error_response_is_valid_http_with_a_status_body():
    raw = error_response(grpc.StatusCode.UNAVAILABLE, "cluster prod is not connected (agent last seen 3m ago)")
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    response = client.next_event()
    assert response.status_code == 502
    body = json.loads(client.next_event().data)
    assert body["message"] == "cluster prod is not connected (agent last seen 3m ago)"
    assert body["code"] == 502 and body["kind"] == "Status"
    assert isinstance(client.next_event(), h11.EndOfMessage)
    assert error_response(grpc.StatusCode.NOT_FOUND, "x").startswith(b"HTTP/1.1 404 ")


def test_only_a_dial_the_relay_never_took_up_is_tried_again():
    """No clusterconnect-reason: gRPC's own status (connection gone, GOAWAY; CANCELLED by a stopping relay's
    core before its handler took the call). With a reason, the relay answered: that answer is the user's."""
    assert Refused(grpc.StatusCode.UNAVAILABLE, "Stream removed").transport_failure
    assert Refused(grpc.StatusCode.CANCELLED, "CANCELLED").transport_failure
    assert not Refused(grpc.StatusCode.UNAVAILABLE, "not connected", DialRefusal.AGENT_NOT_CONNECTED).transport_failure
    assert not Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "relay did not answer").transport_failure
    assert not Refused(grpc.StatusCode.UNAUTHENTICATED, "token refused").transport_failure
    assert not Refused(None, "no login").transport_failure


def test_describe_rpc_error_names_tls_failures():
    details = "failed to connect to all addresses; last error: UNKNOWN: Ssl handshake failed: CERTIFICATE_VERIFY_FAILED"
    assert "TLS verification failed" in describe_rpc_error(grpc.StatusCode.UNAVAILABLE, details, "https://r:1")
    not_found = describe_rpc_error(grpc.StatusCode.NOT_FOUND, "cluster x is not registered", "r")
    assert not_found == "cluster x is not registered"


def test_kubeconfig_merge_keeps_other_entries_and_mode(tmp_path):
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "other",
        "clusters": [{"name": "other", "cluster": {"server": "https://o"}}],
        "users": [{"name": "o", "user": {"token": "t"}}],
        "contexts": [{"name": "other", "context": {"cluster": "other", "user": "o"}}],
    }))
    entries = kubeconfig.build_entries("prod", "https://127.0.0.1:47011", b"CA", KeyPair(b"CERT", b"KEY"), "tok", None)
    assert kubeconfig.write([path], entries) == path
    assert kubeconfig.write([path], entries) == path  # idempotent: the entries are ours now
    config = yaml.safe_load(path.read_text())
    assert [c["name"] for c in config["clusters"]] == ["other", "prod"]
    assert config["current-context"] == "prod"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_kubeconfig_files_are_the_KUBECONFIG_list(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path}/a::{tmp_path}/b:{tmp_path}/a")
    assert kubeconfig.files() == [tmp_path / "a", tmp_path / "b"]
    assert kubeconfig.default_file(kubeconfig.files()) == tmp_path / "b"  # none exists: the last
    (tmp_path / "b").write_text("")
    assert kubeconfig.default_file(kubeconfig.files()) == tmp_path / "b"  # the first that exists
    monkeypatch.delenv("KUBECONFIG")
    assert kubeconfig.files() == [Path.home() / ".kube" / "config"]


@pytest.mark.parametrize(("relay", "name"), [
    ("https://relay.example.com:8443", "relay.example.com-prod"),
    ("https://relay.example.com", "relay.example.com-prod"),
    ("https://127.0.0.1:40123", "127.0.0.1:40123-prod"),
    ("relay.example.com:9000", "relay.example.com:9000-prod"),
])
def test_the_default_context_is_named_after_the_relay_and_the_cluster(relay, name):
    assert kubeconfig.context_name(relay, "prod") == name


def test_store_add_get_remove(tmp_path):
    # Agent authentication (join tokens, certificates) is tested in test_agent_identity.py.
    async def body() -> None:
        store = await ClusterStore.open(await Store.open(SqliteKV(tmp_path / "relay.db")))
        assert (await store.add("prod")).name == "prod"
        assert store.get("prod") is not None and store.get("other") is None
        with pytest.raises(AlreadyExists):
            await store.add("prod")
        with pytest.raises(InvalidName):
            await store.add("Not_Valid")
        assert await store.remove("prod") and store.get("prod") is None
        assert not await store.remove("prod")

    asyncio.run(body())


def test_pki_creates_once_and_reissues_for_new_hosts(tmp_path):
    ca, cert, key = ensure_ca_and_server_cert(tmp_path, "test CA", ["localhost", "127.0.0.1"])
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first = cert.read_bytes()
    ensure_ca_and_server_cert(tmp_path, "test CA", ["localhost", "127.0.0.1"])
    assert cert.read_bytes() == first
    ensure_ca_and_server_cert(tmp_path, "test CA", ["localhost", "127.0.0.1", "relay.example.com"])
    assert cert.read_bytes() != first
    assert ca_hash(ca.read_bytes()).startswith("sha256:")
    assert ca_hash(create_ca("x").cert_pem) != ca_hash(ca.read_bytes())


def test_ago():
    assert ago(5) == "5s ago" and ago(180) == "3m ago" and ago(7200) == "2h ago"


def test_a_request_without_credentials_learns_that_client_certificates_do_not_cross_the_tunnel():
    from clusterconnect.aadproxy.authn import Reject, bearer_token

    rejected = bearer_token([(b"host", b"cluster")])
    assert isinstance(rejected, Reject) and rejected.status == 401
    assert "a client certificate cannot cross the tunnel" in rejected.message
    assert "clusterconnect login" in rejected.message
