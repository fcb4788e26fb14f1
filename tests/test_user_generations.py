"""A user removed and added again under the same name is a new identity (#11 point 2): the old one's
tokens, refresh credentials and group memberships stay refused.

Unit: the relay's stores and access check in-process. End to end: real relay, auth proxy (OIDC mode,
trusting the relay's built-in issuer), agent and client proxies against the devcluster; the apiserver's
audit log says as whom requests arrived.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import secrets
import sqlite3
from contextlib import closing

import grpc
import jwt
import pytest
from chain import wait_until
from https_client import Endpoint
from identities import (
    POD_READER,
    builtin_issuer_chain,
    grant_role,
    login_with_code,
)
from test_user_identity import _relay_parts, mint

from clusterconnect import credentials
from clusterconnect.relay.user_identity.access import DialAuthorizer, Entry
from clusterconnect.relay.user_identity.users import UserError

PROXY_NS = "clusterconnect-generations"
NS = "generations"


def test_the_old_identity_of_a_name_is_refused(tmp_path):
    clusters, _, issuer, verifier, users, access = _relay_parts(tmp_path)
    asyncio.run(clusters.add("dev"))
    asyncio.run(access.grant("dev", Entry("user", "dave")))
    authorizer = DialAuthorizer(access, verifier, users, issuer.url)
    old, code, _ = asyncio.run(users.add("dave", ["old-team"]))
    _, old_credential = asyncio.run(users.redeem_code(code, "laptop"))
    old_token = mint(issuer, old.name, old.groups, old.uid)
    assert asyncio.run(authorizer.check("dev", old_token)).allowed
    asyncio.run(users.remove("dave"))
    new, code, _ = asyncio.run(users.add("dave", ["new-team"]))
    assert new.uid != old.uid
    refused = asyncio.run(authorizer.check("dev", old_token))
    assert not refused.allowed and refused.code == grpc.StatusCode.PERMISSION_DENIED, refused
    with pytest.raises(UserError, match="not valid"):
        asyncio.run(users.user_of_credential(old_credential))
    _, new_credential = asyncio.run(users.redeem_code(code, "laptop"))
    user = asyncio.run(users.user_of_credential(new_credential))
    assert (user.uid, user.groups) == (new.uid, ("new-team",))
    new_token = mint(issuer, user.name, user.groups, user.uid)
    admitted = asyncio.run(authorizer.check("dev", new_token))
    assert admitted.allowed and admitted.identity.groups == ("new-team",)
    # a token without the uid claim (or one of a user who never existed) is refused too
    assert not asyncio.run(authorizer.check("dev", mint(issuer, "dave", ("new-team",), ""))).allowed


def test_users_of_an_earlier_version_get_an_id_and_keep_their_logins(tmp_path):
    db = tmp_path / "relay.db"
    with closing(sqlite3.connect(db)) as old:  # the tables as the previous version wrote them
        old.executescript("""
            CREATE TABLE users (name TEXT PRIMARY KEY, groups TEXT NOT NULL DEFAULT '', created_unix INTEGER NOT NULL);
            CREATE TABLE user_login_codes (code_sha256 TEXT PRIMARY KEY, user TEXT NOT NULL, expires_unix INTEGER);
            CREATE TABLE user_credentials (credential_sha256 TEXT PRIMARY KEY, user TEXT NOT NULL,
                device TEXT NOT NULL DEFAULT '', created_unix INTEGER NOT NULL,
                last_used_unix INTEGER NOT NULL DEFAULT 0);
            INSERT INTO users VALUES ('erin', 'dev', 1);
            INSERT INTO user_credentials (credential_sha256, user, device, created_unix) VALUES
                ('2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b', 'erin', 'old-laptop', 1);
        """)  # the SHA-256 of "secret"
        old.commit()
    _, _, _, _, users, _ = _relay_parts(tmp_path)
    erin = asyncio.run(users.user_of_credential("secret"))
    assert erin.name == "erin" and len(erin.uid) == 16
    (listed,) = users.credentials("erin")
    assert listed.id and listed.device == "old-laptop" and listed.expires_unix > listed.created_unix


# ---- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generations(devcluster, tmp_path_factory):
    """Cluster dev lists user dave; in the cluster, group old-team may read pods in NS, new-team nothing."""
    state = tmp_path_factory.mktemp("user-generations")
    devcluster.create_namespace(NS)
    grant_role(devcluster, NS, "pod-reader", POD_READER, "generations-old-team", groups=["old-team"])
    with builtin_issuer_chain(devcluster, state, PROXY_NS) as chain:
        chain.cli("clusters", "grant", chain.cluster, "--user", "dave")
        yield type("Generations", (), {"chain": chain, "devcluster": devcluster})


def _audited(devcluster, marker: str) -> list[dict]:
    return [e for e in devcluster.audit_events() if marker in e.get("requestURI", "")]


def _get_pods(kubeconfig, token: str | None, marker: str) -> int:
    return Endpoint(kubeconfig, token).one_request(f"/api/v1/namespaces/{NS}/pods?labelSelector=case%3D{marker}")


def test_a_user_added_again_does_not_inherit_the_old_tokens_or_groups(generations, tmp_path):
    chain, devcluster = generations.chain, generations.devcluster
    old_state, new_state = tmp_path / "old", tmp_path / "new"
    login_with_code(chain, "dave", ["old-team"], old_state)
    login = credentials.list_logins(old_state)[0]
    old_token, _ = credentials.get_token(old_state, login)  # valid for the relay's default 10 minutes
    token_file = tmp_path / "old-dave.token"
    token_file.write_text(old_token)
    token_file.chmod(0o600)
    old_kubeconfig = tmp_path / "old.kubeconfig"
    old_proxy, _ = chain.start_proxy(token_file, old_kubeconfig, name="proxy-old-dave")
    try:
        before = f"before-{secrets.token_hex(4)}"
        assert _get_pods(old_kubeconfig, None, before) == 200
        event = wait_until(lambda: _audited(devcluster, before), 10, "the first request's audit event")[-1]
        assert event["impersonatedUser"]["username"] == "dave" and "old-team" in event["impersonatedUser"]["groups"]

        removed = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        chain.cli("users", "remove", "dave")
        login_with_code(chain, "dave", ["new-team"], new_state)

        # the old token, unexpired and still naming old-team, on a new connection: refused at the relay
        after = f"after-{secrets.token_hex(4)}"
        assert _get_pods(old_kubeconfig, None, after) == 403
        assert jwt.decode(old_token, options={"verify_signature": False})["uid"] != \
            jwt.decode(credentials.get_token(new_state, login)[0], options={"verify_signature": False})["uid"]
        with pytest.raises(credentials.LoginError, match="not valid"):
            credentials.refresh(credentials.load(old_state, login))  # the old refresh credential

        new_kubeconfig = tmp_path / "new.kubeconfig"
        new_proxy, _ = chain.start_proxy(None, new_kubeconfig, name="proxy-new-dave", state_dir=new_state)
        try:
            whoami = devcluster.kubectl("auth", "whoami", "-o", "json", user_kubeconfig=new_kubeconfig, check=True)
            user = json.loads(whoami.stdout)["status"]["userInfo"]
            assert user["username"] == "dave" and "new-team" in user["groups"] and "old-team" not in user["groups"]
            new = f"new-{secrets.token_hex(4)}"
            assert _get_pods(new_kubeconfig, credentials.get_token(new_state, login)[0], new) == 403  # RBAC
            # Audit events are written in order: once the new user's request is there, the refused one would be.
            seen = wait_until(lambda: _audited(devcluster, new), 10, "the new user's audit event")
            assert "old-team" not in seen[-1]["impersonatedUser"]["groups"]
        finally:
            new_proxy.stop()
        assert _audited(devcluster, after) == [], "the old identity's request reached the apiserver"
        for event in devcluster.audit_events():
            impersonated = event.get("impersonatedUser") or {}
            if event["requestReceivedTimestamp"] > removed and impersonated.get("username") == "dave":
                assert "old-team" not in impersonated.get("groups", []), f"old-team reached the apiserver: {event}"
    finally:
        old_proxy.stop()
