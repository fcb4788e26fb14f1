"""OIDC users through the whole chain: real Hydra, real kubectl, real apiserver (audit log checked).

kubectl -> clusterconnect proxy -> relay <- agent -> aadproxy (--authentication-config) -> apiserver.
alice logs in at Hydra (authorization code flow, headless); her id_token is the token file of the
client proxy's kubeconfig. The auth proxy runs with its own ServiceAccount token, whose RBAC is the
ClusterRole from deploy/k8s/aadproxy.yaml (impersonate + create subjectaccessreviews).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time

import jwt
import pytest
import yaml
from chain import Chain, wait_until
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from https_client import Endpoint
from identities import POD_READER, authproxy_kubeconfig, grant_role, hydra_issuer, write_authentication_config

PROXY_NS = "clusterconnect-oidc"
DEV_NS = "dev"
ISSUED: list[str] = []  # every token this module handled: none may appear in any log


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def oidc(devcluster, oidc_provider, tmp_path_factory):
    state = tmp_path_factory.mktemp("oidc-chain")
    # alice's permissions: read pods in namespace dev, through her group
    devcluster.create_namespace(DEV_NS)
    grant_role(devcluster, DEV_NS, "pod-reader", POD_READER, "oidc-dev-pod-reader", groups=["oidc:dev"])
    # the auth proxy's own identity, with exactly the deployed ClusterRole
    proxy_kubeconfig, own_token = authproxy_kubeconfig(devcluster, PROXY_NS, state / "aadproxy.kubeconfig")
    ISSUED.append(own_token)
    config = write_authentication_config(state / "authentication.yaml", hydra_issuer(oidc_provider, prefix="oidc:"))

    alice = oidc_provider.login("alice", ["dev"])
    ISSUED.append(alice)
    token_file = state / "alice.token"
    token_file.write_text(alice)
    token_file.chmod(0o600)

    tunnel = Chain(state, proxy_kubeconfig, log_level="debug",
                   authproxy_args=["--authentication-config", str(config), "--cluster", "dev"])
    kubeconfig = state / "kubeconfig"
    with tunnel.running(token_file, kubeconfig):
        yield type("OIDC", (), {"chain": tunnel, "kubeconfig": kubeconfig, "provider": oidc_provider,
                                "devcluster": devcluster, "alice": alice, "endpoint": Endpoint(kubeconfig)})


def kubectl(oidc, *args, check: bool = False):
    return oidc.devcluster.kubectl(*args, user_kubeconfig=oidc.kubeconfig, check=check)


# ---- alice ---------------------------------------------------------------------------------------


def test_alice_reads_pods_in_dev_and_is_forbidden_in_kube_system(oidc) -> None:
    ok = kubectl(oidc, "get", "pods", "-n", DEV_NS)
    assert ok.returncode == 0, ok.stderr
    denied = kubectl(oidc, "get", "pods", "-n", "kube-system")
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr and 'User "oidc:alice"' in denied.stderr, denied.stderr


def test_whoami_shows_mapped_identity(oidc) -> None:
    result = kubectl(oidc, "auth", "whoami", "-o", "json", check=True)
    user = json.loads(result.stdout)["status"]["userInfo"]
    assert user["username"] == "oidc:alice"
    assert "oidc:dev" in user["groups"] and "system:authenticated" in user["groups"]


@pytest.mark.parametrize("args, expected", [
    (("list", "pods", "-n", DEV_NS), "yes"),
    (("get", "pods", "-n", DEV_NS), "yes"),
    (("create", "pods", "-n", DEV_NS), "no"),
    (("list", "pods", "-n", "kube-system"), "no"),
    (("list", "secrets", "-n", DEV_NS), "no"),
])
def test_can_i_agrees_with_rbac(oidc, args, expected) -> None:
    result = kubectl(oidc, "auth", "can-i", *args)
    assert result.stdout.strip() == expected, result.stderr


def test_as_needs_impersonation_permission(oidc) -> None:
    denied = kubectl(oidc, "--as", "admin", "get", "pods", "-n", DEV_NS)
    assert denied.returncode != 0
    assert 'cannot impersonate users "admin"' in denied.stderr, denied.stderr
    denied = kubectl(oidc, "--as", "oidc:alice", "--as-group", "system:masters", "get", "pods", "-n", DEV_NS)
    assert denied.returncode != 0 and "cannot impersonate" in denied.stderr, denied.stderr

    dc = oidc.devcluster
    dc.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
              "metadata": {"name": "oidc-test-impersonate-bob"},
              "rules": [{"apiGroups": [""], "resources": ["users"], "verbs": ["impersonate"],
                         "resourceNames": ["bob"]}]})
    dc.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
              "metadata": {"name": "oidc-test-impersonate-bob"},
              "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                          "name": "oidc-test-impersonate-bob"},
              "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "oidc:alice"}]})
    allowed = kubectl(oidc, "--as", "bob", "auth", "whoami", "-o", "json")
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["status"]["userInfo"]["username"] == "bob"
    # bob, but not bob with an extra group
    denied = kubectl(oidc, "--as", "bob", "--as-group", "oidc:dev", "get", "pods", "-n", DEV_NS)
    assert denied.returncode != 0 and 'cannot impersonate groups "oidc:dev"' in denied.stderr, denied.stderr


def test_serviceaccount_tokens_still_pass_through(oidc) -> None:
    dc = oidc.devcluster
    dc.create_service_account(DEV_NS, "sa-caller")
    token = dc.token(DEV_NS, "sa-caller")
    ISSUED.append(token)
    config = yaml.safe_load(oidc.kubeconfig.read_text())
    for user in config["users"]:  # another token; the proxy's client certificate stays
        user["user"] = {**{k: v for k, v in user["user"].items() if k.startswith("client-")}, "token": token}
    sa_kubeconfig = oidc.kubeconfig.with_name("sa-caller.kubeconfig")
    sa_kubeconfig.write_text(yaml.safe_dump(config))
    result = oidc.devcluster.kubectl("auth", "whoami", "-o", "json", user_kubeconfig=sa_kubeconfig)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"]["userInfo"]["username"] == f"system:serviceaccount:{DEV_NS}:sa-caller"


# ---- attacks: each fails with 401/403 and never reaches the apiserver as anyone but alice ---------


def _craft(oidc, case: str) -> str:
    provider = oidc.provider
    if case == "untrusted-issuer":
        evil = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return jwt.encode(provider.claims(iss="https://127.0.0.1:1"), evil, algorithm="RS256",
                          headers={"kid": provider.kid})
    if case == "wrong-audience":
        return provider.sign(provider.claims(aud=["someone-else"]))
    if case == "expired":
        now = int(time.time())
        return provider.sign(provider.claims(iat=now - 7200, nbf=now - 7200, exp=now - 3600))
    if case == "not-yet-valid":
        now = int(time.time())
        return provider.sign(provider.claims(iat=now + 3600, nbf=now + 3600, exp=now + 7200))
    if case == "alg-none":
        return b64(json.dumps({"alg": "none", "kid": provider.kid}).encode()) + "." + \
            b64(json.dumps(provider.claims()).encode()) + "."
    if case == "hs256-public-key":
        published = next(k for k in provider.jwks()["keys"] if k["kid"] == provider.kid)
        public = jwt.algorithms.RSAAlgorithm.from_jwk(published)
        secret = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        signing_input = b64(json.dumps({"alg": "HS256", "kid": provider.kid, "typ": "JWT"}).encode()) + "." + \
            b64(json.dumps(provider.claims()).encode())
        return signing_input + "." + b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())
    if case == "unknown-kid":
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return provider.sign(provider.claims(), key=other, headers={"kid": "unknown-" + secrets.token_hex(4)})
    if case == "truncated":
        return oidc.alice[: len(oidc.alice) - 20]
    if case == "garbage":
        return "not-a-token-" + secrets.token_hex(16)
    raise AssertionError(case)


TOKEN_CASES = ["untrusted-issuer", "wrong-audience", "expired", "not-yet-valid", "alg-none", "hs256-public-key",
               "unknown-kid", "truncated", "garbage"]

HEADER_CASES = {
    "impersonate-user": [("Impersonate-User", "system:admin")],
    "impersonate-group": [("Impersonate-User", "oidc:alice"), ("Impersonate-Group", "system:masters")],
    "impersonate-uid": [("Impersonate-User", "oidc:alice"), ("Impersonate-Uid", "0")],
    "impersonate-extra": [("Impersonate-User", "oidc:alice"), ("Impersonate-Extra-Scopes", "all")],
    "case-tricks": [("IMPERSONATE-USER", "system:admin"), ("impersonate-GROUP", "system:masters")],
    "connection-named": [("Connection", "Impersonate-User"), ("Impersonate-User", "system:admin")],
    "two-authorization": [("Authorization", "Bearer second-token")],
}


def _request(oidc, token: str, extra: list[tuple[str, str]], marker: str) -> tuple[int, str]:
    endpoint = oidc.endpoint
    conn = endpoint.connect()
    try:
        conn.putrequest("GET", f"/api/v1/namespaces/kube-system/secrets?labelSelector=case%3D{marker}",
                        skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {token}")
        conn.putheader("Accept", "application/json")
        for name, value in extra:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def _audit_for(oidc, marker: str) -> list[dict]:
    events = []
    for line in oidc.devcluster.audit_log.read_text(errors="replace").splitlines():
        if marker in line:
            events.append(json.loads(line))
    return events


@pytest.mark.parametrize("case", TOKEN_CASES + list(HEADER_CASES))
def test_attack_is_refused_and_never_reaches_apiserver_as_anyone_else(oidc, case) -> None:
    marker = f"{case}-{secrets.token_hex(4)}"
    if case in HEADER_CASES:
        token, extra = oidc.alice, HEADER_CASES[case]
    else:
        token, extra = _craft(oidc, case), []
        ISSUED.append(token)
    status, body = _request(oidc, token, extra, marker)
    assert status in (401, 403), (status, body[:300])
    if case in TOKEN_CASES or case == "two-authorization":
        assert status == 401, body[:300]
    # The audit log is written when a response completes, in order: once a valid request sent after the
    # attack is in it, so would the attack's be.
    canary = f"canary-{secrets.token_hex(4)}"
    assert _request(oidc, oidc.alice, [], canary)[0] == 403
    wait_until(lambda: _audit_for(oidc, canary), 10, "the canary's audit event")
    events = _audit_for(oidc, marker)
    # Only the header named in Connection may be dropped and the request go on, as alice, for the
    # apiserver to refuse (and audit); every other attack ends before the apiserver.
    if case == "connection-named" and "cannot list" in _message(body):
        assert events, "the apiserver refused the request but no audit event names it"
    else:
        assert events == [], "refused request reached the apiserver"
    for event in events:
        effective = (event.get("impersonatedUser") or event["user"]).get("username")
        assert effective == "oidc:alice", event
        assert not (event.get("impersonatedUser") or {}).get("groups") or \
            "system:masters" not in event["impersonatedUser"]["groups"], event


def _message(body: str) -> str:
    try:
        return str(json.loads(body).get("message", ""))
    except ValueError:
        return body


def test_valid_token_reaches_apiserver_impersonated(oidc) -> None:
    marker = f"valid-{secrets.token_hex(4)}"
    status, _ = _request(oidc, oidc.alice, [], marker)
    assert status == 403  # alice may not read kube-system secrets: the apiserver said so
    events = wait_until(lambda: _audit_for(oidc, marker), 5, "audit event")
    assert events[-1]["user"]["username"] == f"system:serviceaccount:{PROXY_NS}:aadproxy"
    assert events[-1]["impersonatedUser"]["username"] == "oidc:alice"
    assert "oidc:dev" in events[-1]["impersonatedUser"]["groups"]


# ---- logs ----------------------------------------------------------------------------------------


def test_per_request_log_event_has_identity(oidc) -> None:
    kubectl(oidc, "get", "pods", "-n", DEV_NS)
    log = oidc.chain.state_dir / "logs" / "aadproxy.log"
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    requests_ = [e for e in events if e.get("event") == "request" and e.get("user") == "oidc:alice"]
    assert requests_, "no per-request event with alice's identity"
    event = requests_[-1]
    assert event["groups"] == ["oidc:dev"] and event["cluster"] == "dev" and event["auth"] == "oidc"
    assert event["method"] and event["path"] and "status" in event and "bytes" in event
    assert len(event.get("trace_id") or "") == 32


def test_no_token_in_any_log(oidc) -> None:
    kubectl(oidc, "get", "pods", "-n", DEV_NS)  # make sure something was logged
    logs = list((oidc.chain.state_dir / "logs").glob("*"))
    assert logs
    for path in logs:
        text = path.read_text(errors="replace")
        for token in ISSUED:
            for piece in {token, token.split(".")[-1]} - {""}:
                assert piece not in text, f"token material in {path.name}"
        assert "Bearer " not in text.replace("Bearer [redacted]", ""), path.name
