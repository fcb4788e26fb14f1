"""User identity at the relay: built-in issuer, login, exec credential plugin, per-cluster access lists.

Unit tests run the relay's code in-process (no network). The end-to-end tests run real processes
(relay with a 4 s access token lifetime, auth proxy in OIDC mode trusting the relay's built-in
issuer, agent, client proxy with a login) against the devcluster with the real kubectl:

kubectl --exec plugin `clusterconnect token`--> clusterconnect proxy --Dial (alice's token)--> relay
(access list) <-- agent --> aadproxy (verifies the relay's tokens, impersonates alice) --> apiserver.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import secrets
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import jwt
import pytest
import yaml
from chain import Chain, free_port, script, wait_until
from fake_clock import FakeClock
from https_client import Endpoint
from identities import (
    POD_READER,
    authproxy_kubeconfig,
    builtin_issuer_chain,
    grant_role,
    hydra_issuer,
    login_with_code,
    write_authentication_config,
)

from clusterconnect import credentials as tokens
from clusterconnect.oidc import AuthenticationConfig, IssuerKeys, Verifier
from clusterconnect.relay.storage import clusters as cluster_storage
from clusterconnect.relay.storage.clusters import ClusterStore
from clusterconnect.relay.storage.kv import SqliteKV
from clusterconnect.relay.storage.sealing import SealingKey
from clusterconnect.relay.storage.store import Store
from clusterconnect.relay.user_identity.access import AccessStore, DialAuthorizer, Entry
from clusterconnect.relay.user_identity.issuer import CLOCK_SKEW, MAX_ACCESS_TOKEN_LIFETIME, Issuer, SigningKeys
from clusterconnect.relay.user_identity.users import UserError, UserStore
from clusterconnect.relay.user_identity.wiring import builtin_issuer_config

ROOT = Path(__file__).resolve().parent.parent
PROXY_NS = "clusterconnect-builtin"
DEV_NS = "dev"
LIFETIME = 4  # seconds: the e2e relay's access token lifetime


# ---- unit: the relay's code in-process ----------------------------------------------------------


def _store(tmp_path) -> Store:
    """The embedded store (SQLite in tmp_path/relay.db): no loop state, so each call may asyncio.run."""
    return asyncio.run(Store.open(SqliteKV(tmp_path / "relay.db")))


def _relay_parts(tmp_path, lifetime=60, skew=1.0):
    db = tmp_path / "relay.db"
    store = _store(tmp_path)
    clusters = asyncio.run(ClusterStore.open(store))
    keys = asyncio.run(SigningKeys.open(store, SealingKey.load_or_create(tmp_path / "sealing.key"), max_age=0,
                                        legacy_db=db))
    issuer = Issuer("https://relay.example:8444", "https://relay.example:8444", keys, lifetime)
    config = builtin_issuer_config(issuer.url, issuer.audience, None)
    verifier = Verifier(AuthenticationConfig(issuers=(config,)), leeway=skew, keys={
        issuer.url: IssuerKeys(config, issuer.local_fetch(), min_refresh_interval=0.0, max_key_age=60.0)})
    users = asyncio.run(UserStore.open(store, db))
    access = asyncio.run(AccessStore.open(store, clusters, db))
    return clusters, keys, issuer, verifier, users, access


def mint(issuer: Issuer, name: str, groups: tuple[str, ...], uid: str) -> str:
    return asyncio.run(issuer.mint(name, groups, uid))[0]


def test_login_code_works_once_and_names_are_checked(tmp_path):
    _, _, _, _, users, _ = _relay_parts(tmp_path)
    user, code, _ = asyncio.run(users.add("alice", ["dev", "ops"]))
    assert user.groups == ("dev", "ops")
    record, credential = asyncio.run(users.redeem_code(code, "laptop"))
    assert record.name == "alice" and asyncio.run(users.user_of_credential(credential)).name == "alice"
    with pytest.raises(UserError):
        asyncio.run(users.redeem_code(code, "again"))
    for bad in ("Alice", "system:admin", "system-x", "", "a" * 80):
        with pytest.raises(UserError):
            asyncio.run(users.add(bad, []))
    with pytest.raises(UserError):
        asyncio.run(users.add("bob", ["system:masters"]))
    asyncio.run(users.remove("alice"))
    with pytest.raises(UserError, match="not valid"):
        asyncio.run(users.user_of_credential(credential))


def test_rotation_keeps_tokens_of_the_previous_key_valid(tmp_path):
    _, keys, issuer, verifier, _, _ = _relay_parts(tmp_path)
    before = mint(issuer, "alice", ("dev",), "uid-of-alice")
    published = [k["kid"] for k in keys.jwks()["keys"]]
    assert len(published) == 2  # current + next (pre-published)
    rotated = asyncio.run(keys.rotate())
    after = mint(issuer, "alice", ("dev",), "uid-of-alice")
    kid_before = jwt.get_unverified_header(before)["kid"]
    kid_after = jwt.get_unverified_header(after)["kid"]
    assert kid_after == rotated.kid != kid_before
    assert kid_after in published, "the new signing key was published before it signed"
    kids = [k["kid"] for k in keys.jwks()["keys"]]
    assert kid_before in kids and kid_after in kids and len(kids) == 3
    for token in (before, after):
        identity = asyncio.run(verifier.verify(token))
        assert identity.username == "alice" and identity.groups == ("dev",)
    claims = jwt.decode(after, options={"verify_signature": False})
    assert claims["aud"] == issuer.audience and claims["exp"] - claims["iat"] == 60
    assert jwt.get_unverified_header(after)["alg"] == "ES256"


def test_login_code_expires_after_its_ttl(tmp_path):
    clock = FakeClock()
    users = UserStore(_store(tmp_path), code_ttl=600, clock=clock)
    _, first, expires = asyncio.run(users.add("alice", ["dev"]))
    second, _ = asyncio.run(users.new_code("alice"))
    assert expires == clock() + 600
    clock.advance(600)
    assert asyncio.run(users.redeem_code(first, "laptop"))[0].name == "alice"  # still valid in its last second
    clock.advance(1)
    with pytest.raises(UserError, match="expired"):
        asyncio.run(users.redeem_code(second, "phone"))


def test_signing_key_rotates_at_its_max_age(tmp_path):
    clock = FakeClock()
    keys = asyncio.run(SigningKeys.open(_store(tmp_path), SealingKey.load_or_create(tmp_path / "sealing.key"),
                                        max_age=3600, clock=clock))
    first = asyncio.run(keys.current()).kid
    clock.advance(3599)
    assert asyncio.run(keys.current()).kid == first
    clock.advance(1)
    assert asyncio.run(keys.current()).kid != first


def test_a_retired_key_is_published_until_every_token_it_signed_expired(tmp_path):
    clock = FakeClock()
    keys = asyncio.run(SigningKeys.open(_store(tmp_path), SealingKey.load_or_create(tmp_path / "sealing.key"),
                                        max_age=0, clock=clock))
    retired = asyncio.run(keys.current()).kid
    asyncio.run(keys.rotate())

    def published() -> list[str]:
        return [k["kid"] for k in keys.jwks()["keys"]]

    clock.advance(MAX_ACCESS_TOKEN_LIFETIME + CLOCK_SKEW)  # a token it signed last may still be alive
    assert retired in published() and len(published()) == 3
    clock.advance(1)
    assert retired not in published() and len(published()) == 2  # current + next
    asyncio.run(keys.rotate())  # a rotation drops it from the store too
    kept = [k.kid for k in keys.ring()]
    assert retired not in kept and len(kept) == 3


def test_access_rule(tmp_path, monkeypatch):
    clusters, keys, issuer, verifier, users, access = _relay_parts(tmp_path, skew=0.0)
    asyncio.run(clusters.add("dev"))
    alice_user = asyncio.run(users.add("alice", ["dev"]))[0]
    bob_user = asyncio.run(users.add("bob", ["ops"]))[0]
    authorizer = DialAuthorizer(access, verifier, users, issuer.url)
    alice = mint(issuer, "alice", ("dev",), alice_user.uid)
    bob = mint(issuer, "bob", ("ops",), bob_user.uid)

    def check(token):
        return asyncio.run(authorizer.check("dev", token))

    # empty list: passthrough, the token is not interpreted
    assert check("a-serviceaccount-token").allowed
    asyncio.run(access.grant("dev", Entry("group", "dev")))
    assert check(alice).allowed
    refused = check(bob)
    assert not refused.allowed and refused.code == grpc.StatusCode.PERMISSION_DENIED and 'user "bob"' in refused.message
    assert check("a-serviceaccount-token").code == grpc.StatusCode.PERMISSION_DENIED
    asyncio.run(access.grant("dev", Entry("user", "bob")))
    assert check(bob).allowed
    asyncio.run(access.revoke("dev", Entry("user", "bob")))
    assert not check(bob).allowed
    asyncio.run(users.remove("alice"))
    assert "removed" in check(alice).message
    # bob's token, but one minted 3 s ago with a lifetime of 2 s: refused as expired, not as not listed
    assert check(bob).code == grpc.StatusCode.PERMISSION_DENIED
    stale = mint(Issuer(issuer.url, issuer.audience, keys, 2, clock=lambda: time.time() - 3), "bob", ("ops",),
                 bob_user.uid)
    expired = check(stale)
    assert expired.code == grpc.StatusCode.UNAUTHENTICATED and "expired" in expired.message
    # a cluster removed and registered again (a second later: created_unix counts seconds) does not
    # inherit the old grants
    assert access.entries("dev") == [Entry("group", "dev")]
    asyncio.run(clusters.remove("dev"))
    later = time.time() + 1
    monkeypatch.setattr(cluster_storage, "time", SimpleNamespace(time=lambda: later))
    asyncio.run(clusters.add("dev"))
    assert access.entries("dev") == []


def test_token_source_caches_and_refreshes_under_a_lock(tmp_path):
    script_file = tmp_path / "print-token"
    counter = tmp_path / "count"
    script_file.write_text(
        f"#!{sys.executable}\nimport json, pathlib, time\ncounter = pathlib.Path({str(counter)!r})\n"
        "n = int(counter.read_text()) + 1 if counter.exists() else 1\ncounter.write_text(str(n))\n"
        "print(json.dumps({'access_token': f'tok{n}', 'expires_on': int(time.time()) + 3}))\n")
    script_file.chmod(0o755)
    tokens.save(tmp_path, "cmd", tokens.CommandLogin(command=str(script_file)))
    first, _ = tokens.get_token(tmp_path, "cmd")
    assert first == "tok1" and tokens.get_token(tmp_path, "cmd")[0] == "tok1"  # cached
    time.sleep(2.2)  # less than a third of the lifetime left
    assert tokens.get_token(tmp_path, "cmd")[0] == "tok2"
    assert (tmp_path / "credentials" / "cmd.json").stat().st_mode & 0o777 == 0o600


# ---- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ident(devcluster, tmp_path_factory):
    state = tmp_path_factory.mktemp("user-identity")
    devcluster.create_namespace(DEV_NS)
    grant_role(devcluster, DEV_NS, "pod-reader", POD_READER, "builtin-dev-pod-reader", groups=[DEV_NS])
    user_state = state / "alice-config"
    kubeconfig = state / "kubeconfig"
    relay_args = ["--access-token-lifetime", str(LIFETIME), "--clock-skew-seconds", "1"]
    with builtin_issuer_chain(devcluster, state, PROXY_NS, log_level="debug", relay_args=relay_args) as chain:
        # a non-empty access list without alice
        chain.cli("clusters", "grant", chain.cluster, "--user", "bob")
        code = login_with_code(chain, "alice", [DEV_NS], user_state)
        _, ready = chain.start_proxy(None, kubeconfig, state_dir=user_state)
        yield type("Ident", (), {"chain": chain, "kubeconfig": kubeconfig, "devcluster": devcluster,
                                 "user_state": user_state, "code": code, "ready": ready})


def kubectl(ident, *args, check=False, timeout=60):
    return ident.devcluster.kubectl(*args, user_kubeconfig=ident.kubeconfig, check=check, timeout=timeout)


def _events(log: Path, event: str, offset: int = 0) -> list[dict]:
    with open(log, "rb") as handle:
        handle.seek(offset)
        lines = handle.read().decode(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{") and f'"event": "{event}"' in line]


def test_login_stores_a_private_credential_and_the_code_works_once(ident):
    files = list((ident.user_state / "credentials").glob("*.json"))
    assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o600
    assert (ident.user_state / "credentials").stat().st_mode & 0o777 == 0o700
    again = subprocess.run([script("clusterconnect"), "login", "--relay", ident.chain.relay_url, "--relay-ca",
                            str(ident.chain.relay_ca), "--code", ident.code, "--state-dir",
                            str(ident.user_state / "second")], capture_output=True, text=True, timeout=30)
    assert again.returncode != 0 and "login code is not valid" in again.stderr


def test_kubeconfig_user_is_the_exec_plugin(ident):
    config = yaml.safe_load(ident.kubeconfig.read_text())
    user = config["users"][0]["user"]
    assert set(user) == {"exec", "extensions"}, user  # the plugin and our mark only
    assert user["exec"]["apiVersion"] == "client.authentication.k8s.io/v1"
    assert user["exec"]["args"][:3] == ["token", "--cluster", "dev"]
    out = subprocess.run([user["exec"]["command"], *user["exec"]["args"]], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    credential = json.loads(out)
    assert credential["kind"] == "ExecCredential" and credential["status"]["expirationTimestamp"]
    # the client proxy's client certificate: kubectl skips the plugin of a user with one of its own
    assert credential["status"]["clientCertificateData"].startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY" in credential["status"]["clientKeyData"]
    claims = jwt.decode(credential["status"]["token"], options={"verify_signature": False})
    assert claims["sub"] == "alice" and claims["groups"] == ["dev"] and claims["aud"] == ident.chain.issuer_url
    assert claims["exp"] - claims["iat"] == LIFETIME


def test_not_on_access_list_is_refused_by_the_relay_then_grant_lets_alice_in(ident):
    chain = ident.chain
    aadproxy_log = chain.state_dir / "logs" / "aadproxy.log"
    offset = aadproxy_log.stat().st_size
    refused = kubectl(ident, "get", "pods", "-n", DEV_NS)
    assert refused.returncode != 0
    assert "Forbidden" in refused.stderr and 'user "alice" may not reach cluster dev' in refused.stderr, \
        refused.stderr
    assert _events(chain.state_dir / "logs" / "relay.log", "dial refused")

    granted = chain.cli("clusters", "grant", chain.cluster, "--group", DEV_NS)
    assert "group:dev" in granted.stdout and "user:bob" in granted.stdout
    # Nothing of the refused request reached the auth proxy: a canary sent after it did, and the log is
    # ordered, so the canary's is the first request event since.
    canary = f"/api/v1/namespaces/{DEV_NS}/pods/canary-{secrets.token_hex(4)}"
    token, _ = tokens.get_token(ident.user_state, tokens.list_logins(ident.user_state)[0])
    assert _raw_get(ident.kubeconfig, token, canary) == 404
    seen = wait_until(lambda: _events(aadproxy_log, "request", offset), 10, "the canary at the auth proxy")
    assert seen[0]["path"] == canary, f"a refused request reached the auth proxy: {seen[0]}"
    ok = kubectl(ident, "get", "pods", "-n", DEV_NS)
    assert ok.returncode == 0, ok.stderr
    denied = kubectl(ident, "get", "pods", "-n", "kube-system")
    assert denied.returncode != 0 and 'User "alice" cannot list' in denied.stderr, denied.stderr


def test_whoami_at_the_apiserver_is_alice_with_her_groups(ident):
    result = kubectl(ident, "auth", "whoami", "-o", "json", check=True)
    user = json.loads(result.stdout)["status"]["userInfo"]
    assert user["username"] == "alice"
    assert "dev" in user["groups"] and "system:authenticated" in user["groups"]
    events = [e for e in _events(ident.chain.state_dir / "logs" / "aadproxy.log", "request")
              if e.get("user") == "alice"]
    assert events and events[-1]["auth"] == "oidc"


def test_unknown_issuer_token_is_refused_on_a_listed_cluster(ident, tmp_path):
    chain = ident.chain
    kubeconfig = tmp_path / "kubeconfig"
    # a proxy with a token the relay cannot verify (e.g. a ServiceAccount token): 403 from the relay
    token_file = tmp_path / "sa.token"
    token_file.write_text(ident.devcluster.token(DEV_NS, "default"))
    process, _ = chain.start_proxy(token_file, kubeconfig, name="proxy-sa")
    try:
        result = ident.devcluster.kubectl("get", "pods", "-n", DEV_NS, user_kubeconfig=kubeconfig, check=False)
        assert result.returncode != 0
        assert "Forbidden" in result.stderr and "admits only users on its access list" in result.stderr, result.stderr
    finally:
        process.stop()


def test_proxy_and_kubectl_keep_working_across_token_lifetimes(ident):
    chain = ident.chain
    relay_log = chain.state_dir / "logs" / "relay.log"
    offset = relay_log.stat().st_size
    port = free_port()
    # a long-running kubectl: `kubectl proxy` asks the exec plugin again whenever its token expired
    long_running = subprocess.Popen(["/usr/bin/kubectl", "--kubeconfig", str(ident.kubeconfig), "proxy",
                                     "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True)
    try:
        wait_until(lambda: _http_ok(port), 20, "kubectl proxy")
        started = time.monotonic()
        rounds = 0
        while time.monotonic() - started < 3.5 * LIFETIME:
            assert _http_ok(port), "kubectl proxy request failed"
            result = kubectl(ident, "get", "pods", "-n", DEV_NS)  # a new process and a new connection: new Dial
            assert result.returncode == 0, result.stderr
            rounds += 1
            time.sleep(0.5)
        assert rounds >= 5
    finally:
        long_running.terminate()
        long_running.wait(10)
    issued = _events(relay_log, "access token issued", offset)
    assert len(issued) >= 3, f"only {len(issued)} tokens issued over {3.5 * LIFETIME}s"
    assert not _events(relay_log, "dial refused", offset)


def _http_ok(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", f"/api/v1/namespaces/{DEV_NS}/pods")
        status = conn.getresponse().status
        conn.close()
        return status == 200
    except OSError:
        return False


def _raw_get(kubeconfig: Path, token: str, path: str) -> int:
    endpoint = Endpoint(kubeconfig, token)
    conn = endpoint.connect()
    try:
        conn.request("GET", path, headers=endpoint.headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_key_rotation_keeps_a_live_token_valid(ident):
    chain = ident.chain
    login = tokens.list_logins(ident.user_state)[0]
    data = tokens.load(ident.user_state, login)
    live, _ = tokens.refresh(data)  # a fresh token, signed with the current key
    rotated = chain.cli("keys", "rotate")
    new_kid = rotated.stdout.split("signing with key ")[1].split(";")[0]
    old_kid = jwt.get_unverified_header(live)["kid"]
    assert new_kid != old_kid and old_kid in rotated.stdout.split("published keys:")[1]
    # the live token still works at the auth proxy right after the rotation
    assert _raw_get(ident.kubeconfig, live, f"/api/v1/namespaces/{DEV_NS}/pods") == 200
    # new tokens are signed with the new key and work end to end (relay and auth proxy)
    fresh, _ = tokens.refresh(data)
    assert jwt.get_unverified_header(fresh)["kid"] == new_kid
    assert _raw_get(ident.kubeconfig, fresh, f"/api/v1/namespaces/{DEV_NS}/pods") == 200
    time.sleep(LIFETIME)  # the proxy's and kubectl's cached tokens are now from the new key
    result = kubectl(ident, "get", "pods", "-n", DEV_NS)
    assert result.returncode == 0, result.stderr


def test_removed_user_cannot_get_tokens(ident, tmp_path):
    chain = ident.chain
    code = chain.cli("users", "add", "carol", "--group", DEV_NS).stdout.splitlines()[1].strip()
    subprocess.run([script("clusterconnect"), "login", "--relay", chain.relay_url, "--relay-ca", str(chain.relay_ca),
                    "--code", code, "--state-dir", str(tmp_path)], check=True, capture_output=True, timeout=30)
    token = [script("clusterconnect"), "token", "--cluster", "dev", "--state-dir", str(tmp_path)]
    assert subprocess.run(token, capture_output=True, timeout=30).returncode == 0
    chain.cli("users", "remove", "carol")
    time.sleep(LIFETIME)
    result = subprocess.run(token, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "refresh credential is not valid" in result.stderr, result.stderr


def test_no_token_in_any_log(ident):
    logs = list((ident.chain.state_dir / "logs").glob("*"))
    assert {"relay.log", "aadproxy.log", "agent.log", "proxy.log"} <= {p.name for p in logs}, logs
    credential = tokens.load(ident.user_state, tokens.list_logins(ident.user_state)[0])
    assert isinstance(credential, tokens.BuiltinLogin) and credential.access_token
    secrets_ = [credential.refresh_credential, credential.access_token, ident.code]
    for path in logs:
        text = path.read_text(errors="replace")
        for secret in secrets_:
            assert secret not in text and secret.split(".")[-1] not in text, f"secret in {path.name}"


# ---- external issuers (Ory Hydra) ----------------------------------------------------------------

RELAY_AUDIENCE = "clusterconnect-relay"


@pytest.fixture(scope="module")
def external(devcluster, oidc_provider_jwt_access_tokens, tmp_path_factory):
    """relay + auth proxy trusting Hydra (prefix hydra:), access list naming the CI client."""
    from oidc_provider import create_machine_client

    hydra = oidc_provider_jwt_access_tokens
    state = tmp_path_factory.mktemp("external-identity")
    client_id, client_secret = create_machine_client(hydra, RELAY_AUDIENCE)
    proxy_kubeconfig, _ = authproxy_kubeconfig(devcluster, PROXY_NS, state / "aadproxy.kubeconfig")
    config = write_authentication_config(state / "authentication.yaml",
                                         hydra_issuer(hydra, RELAY_AUDIENCE, prefix="hydra:", groups=False))
    chain = Chain(state, proxy_kubeconfig, relay_args=["--authentication-config", str(config)],
                  authproxy_args=["--authentication-config", str(config), "--cluster", "dev"])
    try:
        chain.start_relay()
        chain.add_cluster()
        chain.start_authproxy()
        chain.start_agent()
        chain.cli("clusters", "grant", chain.cluster, "--user", f"hydra:{client_id}")
        yield type("External", (), {"chain": chain, "hydra": hydra, "client_id": client_id,
                                    "client_secret": client_secret, "state": state, "devcluster": devcluster})
    finally:
        chain.stop_all()


def _login(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([script("clusterconnect"), "login", *args], capture_output=True, text=True, timeout=60)


def _whoami(ext, kubeconfig: Path) -> subprocess.CompletedProcess:
    return ext.devcluster.kubectl("auth", "whoami", "-o", "json", user_kubeconfig=kubeconfig, check=False)


def _assert_proxy_sees_hydra_client(ext, state_dir: Path, login: str) -> None:
    """A client proxy using the stored login reaches the listed cluster as the Hydra client."""
    kubeconfig = state_dir / "kubeconfig"
    process, _ = ext.chain.start_proxy(None, kubeconfig, name=f"proxy-{login}", login=login, state_dir=state_dir)
    try:
        result = _whoami(ext, kubeconfig)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["status"]["userInfo"]["username"] == f"hydra:{ext.client_id}"
    finally:
        process.stop()


def test_client_credentials_login_reaches_a_listed_cluster(external, tmp_path):
    ext = external
    # "--client-secret=": the random secret may begin with "-", which argparse would take for a flag
    login = _login("--issuer", ext.hydra.issuer, "--client-id", ext.client_id, f"--client-secret={ext.client_secret}",
                   "--issuer-ca", str(ext.hydra.ca_file), "--audience", RELAY_AUDIENCE, "--name", "ci",
                   "--state-dir", str(tmp_path))
    assert login.returncode == 0, login.stderr
    _assert_proxy_sees_hydra_client(ext, tmp_path, "ci")


def test_token_command_login(external, tmp_path):
    ext = external
    # "--client-secret=": the random secret may begin with "-", which argparse would take for a flag
    login = _login("--issuer", ext.hydra.issuer, "--client-id", ext.client_id, f"--client-secret={ext.client_secret}",
                   "--issuer-ca", str(ext.hydra.ca_file), "--audience", RELAY_AUDIENCE, "--name", "ci",
                   "--state-dir", str(tmp_path / "other"))
    assert login.returncode == 0, login.stderr
    command = tmp_path / "print-token"
    token_command = f"{script('clusterconnect')} token --login ci --state-dir {tmp_path / 'other'}"
    command.write_text(f"#!/bin/sh\nexec {token_command}\n")
    command.chmod(0o755)
    login = _login("--token-command", str(command), "--name", "tool", "--state-dir", str(tmp_path))
    assert login.returncode == 0, login.stderr
    _assert_proxy_sees_hydra_client(ext, tmp_path, "tool")


def test_device_login_reports_an_issuer_without_the_device_grant(external, tmp_path):
    # Ory Hydra v2.3.0 does not implement RFC 8628: the client must say so, not hang or crash.
    result = _login("--issuer", external.hydra.issuer, "--client-id", external.client_id,
                    "--issuer-ca", str(external.hydra.ca_file), "--state-dir", str(tmp_path))
    assert result.returncode != 0
    assert "does not offer the device authorization grant" in result.stderr, result.stderr
