"""Agent identity: one-time join token + pinned relay CA -> a client certificate for exactly one cluster.

The end-to-end tests run real processes (Chain) against the devcluster; the unit tests at the top
check the pure logic (CA pinning, CSR rules, the enrollment tables).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from chain import Chain, script, wait_until
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from fake_clock import FakeClock
from https_client import Endpoint
from kube import kubectl

from clusterconnect import metadata as md
from clusterconnect.agent import enrollment as agent_enrollment
from clusterconnect.agentcert import build_csr, uri_for
from clusterconnect.pki import ca_hash, create_ca, issue_server_cert
from clusterconnect.relay.agent_identity import pki as agent_pki
from clusterconnect.relay.agent_identity.enrollment import EnrollmentStore
from clusterconnect.relay.agent_identity.pki import CsrInvalid, CsrRefused
from clusterconnect.relay.storage.kv import SqliteKV
from clusterconnect.relay.storage.sealing import SealingKey
from clusterconnect.relay.storage.store import Store
from clusterconnect.v1 import enrollment_pb2, enrollment_pb2_grpc, tunnel_pb2, tunnel_pb2_grpc

LIFETIME = 6  # seconds: the agent renews every 4 s

# -- unit tests: pure logic -----------------------------------------------------------------------


def _csr(cluster_cn: str | None = None, sans: list[x509.GeneralName] | None = None, ca: bool | None = None,
         key=None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cluster_cn)]) if cluster_cn else x509.Name([])
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_csr_of_the_agent_is_accepted_and_carries_only_the_public_key():
    key = ec.generate_private_key(ec.SECP256R1())
    pem = build_csr(key, "prod")
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    assert b"PRIVATE" not in pem
    csr = agent_pki.validate_csr(pem, "prod")
    assert csr.public_key() == key.public_key()
    assert scalar not in csr.public_bytes(serialization.Encoding.DER)  # the secret scalar is not in it
    # Empty subject and no extensions is fine too: the relay names the cluster itself.
    agent_pki.validate_csr(_csr(), "prod")


@pytest.mark.parametrize("pem,error", [
    (lambda: _csr("cluster:other"), CsrRefused),
    (lambda: _csr("cluster:prod", [x509.UniformResourceIdentifier(uri_for("other"))]), CsrRefused),
    (lambda: _csr("cluster:prod", [x509.UniformResourceIdentifier(uri_for("prod")), x509.DNSName("relay.example")]),
     CsrRefused),
    (lambda: _csr("cluster:prod", ca=True), CsrRefused),
    (lambda: _csr("admin"), CsrRefused),
    (lambda: _csr(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)), CsrRefused),
    (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n", CsrInvalid),
    (lambda: b"garbage", CsrInvalid),
])
def test_relay_refuses_csrs_for_other_clusters_or_a_ca(pem, error):
    with pytest.raises(error):
        agent_pki.validate_csr(pem(), "prod")


def test_csr_with_a_broken_signature_is_invalid():
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    good = x509.load_pem_x509_csr(build_csr(key, "prod"))
    # Same request info, signature from another key.
    forged = x509.CertificateSigningRequestBuilder().subject_name(good.subject).sign(other, hashes.SHA256())
    der = bytearray(forged.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n" + __import__("base64").encodebytes(bytes(der)) + \
        b"-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(CsrInvalid):
        agent_pki.validate_csr(pem, "prod")


def test_issued_certificate_names_exactly_its_cluster(tmp_path):
    store = asyncio.run(Store.open(SqliteKV(tmp_path / "relay.db")))
    sealing = SealingKey.load_or_create(tmp_path / "sealing.key")
    ca = asyncio.run(agent_pki.ensure_agent_ca(store, sealing, tmp_path))
    assert asyncio.run(agent_pki.ensure_agent_ca(store, sealing, tmp_path)) == ca  # made once
    assert b"PRIVATE KEY" not in (tmp_path / "relay.db").read_bytes() + (tmp_path / "relay.db-wal").read_bytes()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = agent_pki.issue(ca, agent_pki.validate_csr(build_csr(key, "prod"), "prod"), "prod",
                           datetime.timedelta(seconds=60))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    identity = agent_pki.identity_of(pem)
    assert identity.cluster == "prod" and identity.serial == cert.serial_number
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.public_key() == key.public_key()
    # A certificate whose CN and SAN disagree names no cluster.
    odd = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cluster:a")]))
           .issuer_name(cert.issuer).public_key(key.public_key()).serial_number(1)
           .not_valid_before(cert.not_valid_before_utc).not_valid_after(cert.not_valid_after_utc)
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri_for("b"))]), False)
           .sign(serialization.load_pem_private_key(ca.key_pem, None), hashes.SHA256()))
    assert agent_pki.identity_of(odd.public_bytes(serialization.Encoding.PEM)) is None


def test_pinned_ca_is_found_only_by_its_hash():
    ca = create_ca("relay CA")
    leaf = issue_server_cert(ca, ["localhost"])
    chain = [x509.load_pem_x509_certificate(p) for p in (leaf.cert_pem, ca.cert_pem)]
    assert agent_enrollment.find_pinned_ca(chain, ca_hash(ca.cert_pem)) == chain[1]
    assert agent_enrollment.find_pinned_ca(chain, ca_hash(ca.cert_pem).upper()) == chain[1]
    assert agent_enrollment.find_pinned_ca(chain, ca_hash(create_ca("other").cert_pem)) is None
    # Pinning the leaf's key does not make the leaf a CA.
    assert agent_enrollment.find_pinned_ca(chain, ca_hash(leaf.cert_pem)) is None


def test_ca_discovery_reads_the_chain_a_grpc_server_presents():
    """The relay serves its CA in the chain; an unverified handshake finds it by hash, a wrong pin fails."""
    ca = create_ca("relay CA")
    leaf = issue_server_cert(ca, ["localhost", "127.0.0.1"])
    server = grpc.server(futures.ThreadPoolExecutor(2))
    credentials = grpc.ssl_server_credentials([(leaf.key_pem, leaf.cert_pem + ca.cert_pem)])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        found = agent_enrollment.discover_ca(f"127.0.0.1:{port}", ca_hash(ca.cert_pem))
        assert x509.load_pem_x509_certificate(found) == x509.load_pem_x509_certificate(ca.cert_pem)
        with pytest.raises(agent_enrollment.EnrollmentError, match="presented no CA certificate with hash"):
            agent_enrollment.discover_ca(f"127.0.0.1:{port}", ca_hash(create_ca("impostor").cert_pem))
    finally:
        server.stop(0)


def test_enrollment_store_tokens_work_once_and_serials_rotate(tmp_path):
    asyncio.run(_enrollment_store_tokens_work_once_and_serials_rotate(tmp_path))


async def _enrollment_store_tokens_work_once_and_serials_rotate(tmp_path):
    clock = FakeClock()
    store = await EnrollmentStore.open(await Store.open(SqliteKV(tmp_path / "relay.db")), clock=clock)
    token, expires = await store.create_join_token("prod")
    assert expires > clock() + 3600
    assert not await store.consume_join_token("other", token)
    assert not await store.consume_join_token("prod", token + "x")
    assert await store.consume_join_token("prod", token)
    assert not await store.consume_join_token("prod", token)  # once
    early, _ = await store.create_join_token("early", lifetime=60)
    late, _ = await store.create_join_token("late", lifetime=60)
    clock.advance(59)
    assert await store.consume_join_token("early", early)
    clock.advance(1)
    assert not await store.consume_join_token("late", late)  # expired

    later = int(clock()) + 60
    first = agent_pki.AgentIdentity("prod", 1, later)
    second = agent_pki.AgentIdentity("prod", 2, later)
    third = agent_pki.AgentIdentity("prod", 3, later)
    await store.record_certificate("prod", 1, later)
    assert store.accepts(first) and not store.accepts(second)
    await store.record_certificate("prod", 2, later, previous=first)
    assert store.accepts(first) and store.accepts(second)  # old connections go on after a renewal
    await store.record_certificate("prod", 3, later, previous=second)
    assert not store.accepts(first) and store.accepts(second) and store.accepts(third)
    assert not store.accepts(agent_pki.AgentIdentity("prod", 3, int(clock()) - 1))  # expired
    assert not store.accepts(agent_pki.AgentIdentity("other", 3, later))
    await store.revoke("prod")
    assert not store.accepts(third)
    # a certificate's own expiry, as time passes
    await store.record_certificate("prod", 4, later)
    fourth = agent_pki.AgentIdentity("prod", 4, later)
    clock.advance(59)
    assert store.accepts(fourth)
    clock.advance(1)
    assert not store.accepts(fourth)


# -- end to end: real relay, agents, auth proxy, client proxy -------------------------------------

NS = "agent-identity"


@pytest.fixture(scope="module")
def identity_chain(devcluster, admin_sa_token, cluster_endpoint_kubeconfig, tmp_path_factory):
    """A chain of its own whose agent certificates live LIFETIME seconds."""
    devcluster.create_namespace(NS)
    chain = Chain(tmp_path_factory.mktemp("agent-identity"), cluster_endpoint_kubeconfig,
                  relay_args=["--agent-cert-lifetime", str(LIFETIME)])
    kubeconfig = chain.state_dir / "kubeconfig"
    with chain.running(admin_sa_token, kubeconfig):
        yield chain, kubeconfig


def _log(chain: Chain, name: str) -> str:
    return (chain.state_dir / "logs" / f"{name}.log").read_text(errors="replace")


def _events(chain: Chain, name: str, event: str) -> list[dict]:
    return [json.loads(line) for line in _log(chain, name).splitlines()
            if line.startswith("{") and f'"event": "{event}"' in line]


def _identity(state_dir: Path) -> tuple[bytes, bytes, bytes]:
    """(key, certificate chain, relay CA) from an agent's state directory."""
    state = agent_enrollment.AgentState(state_dir)
    identity = state.identity()
    return identity.key_pem, identity.cert_pem, state.relay_ca()


def _connect(chain: Chain, state_dir: Path | None, claim: str, hello: str | None = None,
             port: int | None = None) -> grpc.RpcError | None:
    """Open AgentTunnel.Connect as an agent with the identity in ``state_dir``; the error, or None if welcomed."""
    root = chain.relay_ca.read_bytes()
    if state_dir is not None:
        key, cert, root = _identity(state_dir)
        credentials = grpc.ssl_channel_credentials(root, key, cert)
    else:
        credentials = grpc.ssl_channel_credentials(root)
    target = f"127.0.0.1:{port or chain.agent_port}"
    with grpc.secure_channel(target, credentials, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = tunnel_pb2_grpc.AgentTunnelStub(channel)
        message = tunnel_pb2.AgentMessage(hello=tunnel_pb2.AgentHello(cluster=hello or claim, agent_version="test"))
        release = threading.Event()

        def requests():
            yield message
            release.wait(10)

        call = stub.Connect(requests(), metadata=((md.CLUSTER, claim),), timeout=10)
        try:
            first = next(call)
            assert first.WhichOneof("message") == "welcome"
            return None
        except grpc.RpcError as exc:
            return exc
        finally:
            release.set()
            call.cancel()


def test_join_token_works_once(identity_chain):
    chain, _ = identity_chain
    join = chain.add_cluster("once")
    assert join["relay_ca_hash"] == ca_hash(chain.relay_ca.read_bytes())
    # The token goes in the environment, not argv (tests/test_secrets_off_argv.py runs the command as printed).
    assert join["agent_command"].startswith(f"CLUSTERCONNECT_JOIN_TOKEN={join['join_token']} clusterconnect-agent ")
    assert f"--relay-ca-hash {join['relay_ca_hash']}" in join["agent_command"]
    first = chain.start_agent(name="agent-once", cluster="once")
    try:
        assert _events(chain, "agent-once", "joined relay")
        # A second agent with the same token and no state of its own is refused and exits.
        second = chain.start_agent(name="agent-once-again", cluster="once",
                                   state_dir=chain.state_dir / "agent-once-again", wait=False)
        assert second.popen.wait(30) == 2
        assert "join token not valid for cluster 'once'" in _log(chain, "agent-once-again")
        assert not (chain.state_dir / "agent-once-again" / "agent.pem").exists()
        # The first agent restarts from its state directory with the same (used) token and connects.
        first.stop()
        chain.start_agent(name="agent-once", cluster="once")
        assert len(_events(chain, "agent-once", "joined relay")) == 1
    finally:
        chain.processes["agent-once"].stop()
        chain.admin("remove", "once")


def test_certificate_of_cluster_a_cannot_serve_cluster_b(identity_chain):
    chain, _ = identity_chain
    chain.add_cluster("alpha")
    chain.add_cluster("beta")
    alpha_state = chain.agent_state("alpha")
    chain.start_agent(name="agent-alpha", cluster="alpha").stop()
    try:
        # An agent with alpha's state directory that claims beta exits before it connects (the relay
        # would refuse it; tests/test_agent_refused.py); below, the relay's own checks.
        impostor = chain.start_agent(name="agent-beta-impostor", cluster="beta", state_dir=alpha_state, wait=False)
        assert impostor.popen.wait(20) == 2
        log = _log(chain, "agent-beta-impostor")
        assert "is for cluster 'alpha', not 'beta'" in log
        assert '"event": "connected to relay"' not in log
        # The same, directly: metadata claim, hello claim, no certificate, the main port.
        assert _connect(chain, alpha_state, "alpha") is None
        error = _connect(chain, alpha_state, "beta")
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        error = _connect(chain, alpha_state, "alpha", hello="beta")
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "hello names cluster 'beta'" in error.details()
        # Without a client certificate the agent port refuses the TLS handshake ...
        assert _connect(chain, None, "alpha").code() == grpc.StatusCode.UNAVAILABLE
        # ... and the main port serves AgentTunnel to nobody.
        error = _connect(chain, None, "alpha", port=chain.relay_port)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        # A CSR for beta on alpha's Renew is refused too.
        key, cert, root = _identity(alpha_state)
        with grpc.secure_channel(f"127.0.0.1:{chain.agent_port}", grpc.ssl_channel_credentials(root, key, cert),
                                 options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            csr = build_csr(ec.generate_private_key(ec.SECP256R1()), "beta")
            with pytest.raises(grpc.RpcError) as refused:
                enrollment_pb2_grpc.EnrollmentStub(channel).Renew(enrollment_pb2.RenewRequest(csr_pem=csr), timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Nor can alpha's join token buy a certificate for beta (and trying does not use it up).
        with grpc.secure_channel(f"127.0.0.1:{chain.relay_port}", grpc.ssl_channel_credentials(root)) as channel:
            stub = enrollment_pb2_grpc.EnrollmentStub(channel)
            token = chain.joins["beta"]["join_token"]
            csr = build_csr(ec.generate_private_key(ec.SECP256R1()), "alpha")
            with pytest.raises(grpc.RpcError) as refused:
                stub.Join(enrollment_pb2.JoinRequest(cluster="beta", join_token=token, csr_pem=csr), timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as refused:
                stub.Join(enrollment_pb2.JoinRequest(cluster="alpha", join_token=token, csr_pem=csr), timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        chain.start_agent(name="agent-beta", cluster="beta").stop()  # beta's token still works for beta
    finally:
        chain.admin("remove", "alpha")
        chain.admin("remove", "beta")


def test_removed_cluster_agent_is_disconnected_and_cannot_reconnect(identity_chain):
    chain, _ = identity_chain
    chain.add_cluster("gone")
    agent = chain.start_agent(name="agent-gone", cluster="gone")
    state = chain.agent_state("gone")
    kept = chain.state_dir / "gone-identity"
    shutil.copytree(state, kept)
    try:
        assert _connect(chain, kept, "gone") is None
        wait_until(lambda: _log(chain, "agent-gone").count('"event": "connected to relay"') >= 2, 10,
                   "the agent to reconnect after the test's own connection replaced its session", agent)
        before = len(_log(chain, "agent-gone"))
        removed = chain.admin("remove", "gone")
        assert "certificate no longer works" in removed.stdout
        # Disconnected and refused for good: the agent exits (it used to retry for ever).
        assert agent.popen.wait(10) == 1
        assert "error: the relay refused this agent: cluster gone was removed" in _log(chain, "agent-gone")
        listing = chain.admin("list").stdout
        assert "gone" not in listing
        # The certificate is still within its validity, but the relay no longer accepts it ...
        valid = time.time() < agent_enrollment.AgentState(kept).identity().not_after.timestamp() - 0.5
        error = _connect(chain, kept, "gone")
        assert error is not None
        if valid:  # (else the TLS handshake already refuses the expired certificate)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
            assert "no longer valid" in error.details()
        # ... not even after a cluster of the same name is added again.
        chain.add_cluster("gone")
        error = _connect(chain, kept, "gone")
        assert error is not None and error.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE)
        after = _log(chain, "agent-gone")[before:]
        assert '"event": "connected to relay"' not in after and "was removed" in after
    finally:
        agent.stop()
        chain.admin("remove", "gone", check=False)


def test_renewal_keeps_a_long_running_watch_alive(identity_chain, devcluster):
    """Certificates live 6 s; one watch connection lasts through several renewals."""
    chain, kubeconfig = identity_chain
    first_identity = chain.state_dir / "first-identity"
    shutil.copytree(chain.agent_state(), first_identity)
    endpoint = Endpoint(kubeconfig)
    conn = endpoint.connect(timeout=20)
    conn.request("GET", f"/api/v1/namespaces/{NS}/configmaps?watch=1&allowWatchBookmarks=false",
                 headers=endpoint.headers)
    response = conn.getresponse()
    assert response.status == 200
    renewed_before = len(_events(chain, "agent", "certificate renewed"))
    try:
        for i in range(5):
            time.sleep(3)
            devcluster.kubectl("create", "configmap", f"renewal-{i}", "-n", NS)
            deadline = time.monotonic() + 10
            while True:
                line = response.readline()
                assert line, f"the watch connection ended after {i} renewal rounds"
                event = json.loads(line)
                if event["object"]["metadata"]["name"] == f"renewal-{i}":
                    assert event["type"] == "ADDED"
                    break
                assert time.monotonic() < deadline
        renewals = len(_events(chain, "agent", "certificate renewed")) - renewed_before
        assert renewals >= 3, renewals
        # New connections go over the session with the newest certificate.
        assert "gitVersion" in kubectl(kubeconfig, "get", "--raw", "/version").stdout
        # The first certificate is past its lifetime now: the relay refuses it.
        error = _connect(chain, first_identity, chain.cluster)
        assert error is not None and error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED)
    finally:
        conn.close()
        for i in range(5):
            devcluster.kubectl("delete", "configmap", f"renewal-{i}", "-n", NS, "--ignore-not-found")


def test_agent_key_is_private_and_never_leaves_the_agent(identity_chain):
    chain, _ = identity_chain
    state = chain.agent_state()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    files = list(state.iterdir())
    assert files, f"nothing in {state}"
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    key_pem = agent_enrollment.AgentState(state).identity().key_pem
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    scalar = key.private_numbers().private_value
    # (Base64 characters 50-90 of the PEM encode the secret scalar; the start is the same for every P-256 key.)
    secrets = [key_pem.split(b"-----")[2].strip()[50:90], scalar.to_bytes(32, "big"), format(scalar, "x").encode()]
    # Nothing the relay keeps or logs contains the key (the relay has only the CSR's public key).
    for root in (chain.relay_data, chain.state_dir / "logs"):
        files = [path for path in root.rglob("*") if path.is_file()]
        assert files, f"nothing in {root}"
        for path in files:
            assert not any(secret in path.read_bytes() for secret in secrets), path
    # The relay stored serials and a hash of the join token, not keys or tokens.
    db = sqlite3.connect(chain.relay_data / "relay.db")
    rows = db.execute("SELECT key, CAST(value AS TEXT) FROM kv WHERE key LIKE 'agent-certificates/%'"
                      " OR key LIKE 'join-tokens/%'").fetchall()
    db.close()
    dump = repr(rows)
    assert "PRIVATE" not in dump and chain.joins[chain.cluster]["join_token"] not in dump
    assert format(agent_enrollment.AgentState(state).identity().serial, "x") in dump


def test_agent_flags_come_from_the_environment_in_a_pod(identity_chain, tmp_path):
    """The pod gets --relay, --cluster, --state-dir, the join token and the CA hash from its environment."""
    chain, _ = identity_chain
    join = chain.add_cluster("podlike")
    env = {**os.environ, "CLUSTERCONNECT_RELAY": chain.relay_url, "CLUSTERCONNECT_CLUSTER": "podlike",
           "CLUSTERCONNECT_STATE_DIR": str(tmp_path / "state"), "CLUSTERCONNECT_JOIN_TOKEN": join["join_token"],
           "CLUSTERCONNECT_RELAY_CA_HASH": join["relay_ca_hash"],
           "CLUSTERCONNECT_AUTHPROXY": f"127.0.0.1:{chain.authproxy_port}"}
    log = chain.state_dir / "logs" / "agent-podlike.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen([script("clusterconnect-agent")], env=env, stdout=handle, stderr=handle,
                                   start_new_session=True)
    try:
        wait_until(lambda: '"event": "connected to relay"' in log.read_text(), 20, "the agent to connect")
    finally:
        process.terminate()
        process.wait(10)
        chain.admin("remove", "podlike")


def test_agent_waits_for_an_unreachable_relay_on_its_first_start(tmp_path):
    """In a pod the relay may not be reachable yet: the agent keeps trying to join instead of exiting."""
    chain = Chain(tmp_path, Path("/nonexistent"))
    port = chain.relay_port = __import__("chain").free_port()
    chain.joins[chain.cluster] = {"join_token": "t", "relay_ca_hash": ca_hash(create_ca("x").cert_pem)}
    agent = chain.start_agent(wait=False)
    try:
        # Retrying, not giving up: a second attempt failed too, and the agent is still there.
        wait_until(lambda: _log(chain, "agent").count("relay not reachable for enrollment; retrying") >= 2, 15,
                   "the agent to retry twice", agent)
        assert agent.alive() and str(port) in _log(chain, "agent")
    finally:
        agent.stop()
