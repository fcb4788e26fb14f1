"""Refresh credentials expire, and one device's can be revoked (#11 point 10): `clusterconnect logout` by
its holder, `clusterconnect users credentials` / `users revoke-credential` by an admin.

Real relay processes and the real CLI; a refresh at the relay (IdentityProvider.IssueToken) is the judge
of whether a credential still works.
"""

from __future__ import annotations

import subprocess
import time

import pytest
from chain import Chain, script, wait_until
from identities import login_with_code

from clusterconnect import credentials

THIRTY_DAYS = 30 * 24 * 3600


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    chain = Chain(tmp_path_factory.mktemp("refresh-credentials"), tmp_path_factory.mktemp("x") / "unused")
    try:
        chain.start_relay()
        yield chain
    finally:
        chain.stop_all()


def _login(state_dir) -> credentials.BuiltinLogin:
    return credentials.load(state_dir, credentials.list_logins(state_dir)[0])


def _works(login: credentials.BuiltinLogin) -> bool:
    try:
        credentials.refresh(login)
    except credentials.LoginError as exc:
        assert "not valid" in str(exc), exc
        return False
    return True


def _two_devices(chain: Chain, user: str, tmp_path) -> tuple[credentials.BuiltinLogin, credentials.BuiltinLogin]:
    login_with_code(chain, user, ["dev"], tmp_path / "laptop")
    code = chain.cli("users", "code", user).stdout.splitlines()[1].strip()
    subprocess.run([script("clusterconnect"), "login", "--relay", chain.relay_url, "--relay-ca", str(chain.relay_ca),
                    "--code", code, "--state-dir", str(tmp_path / "desktop")], check=True, capture_output=True,
                   timeout=30)
    return _login(tmp_path / "laptop"), _login(tmp_path / "desktop")


def test_an_admin_lists_a_users_credentials_and_revokes_one_at_once(relay, tmp_path):
    laptop, desktop = _two_devices(relay, "frank", tmp_path)
    assert laptop.credential_id and desktop.credential_id and laptop.credential_id != desktop.credential_id
    assert _works(laptop) and _works(desktop)
    listed = relay.cli("users", "credentials", "frank").stdout
    assert laptop.credential_id in listed and desktop.credential_id in listed, listed
    for secret in (laptop.refresh_credential, desktop.refresh_credential):
        assert secret not in listed
    assert abs(laptop.credential_expires_unix - (time.time() + THIRTY_DAYS)) < 60  # the default lifetime

    revoked = relay.cli("users", "revoke-credential", "frank", laptop.credential_id)
    assert "revoked" in revoked.stdout
    assert not _works(laptop), "a revoked credential still gets tokens"
    assert _works(desktop), "revoking one device's credential ended another's"
    listed = relay.cli("users", "credentials", "frank").stdout
    assert laptop.credential_id not in listed and desktop.credential_id in listed, listed
    again = relay.cli("users", "revoke-credential", "frank", laptop.credential_id, check=False)
    assert again.returncode != 0 and f"no credential {laptop.credential_id}" in again.stderr, again.stderr


def _logout(state_dir) -> subprocess.CompletedProcess:
    return subprocess.run([script("clusterconnect"), "logout", "--state-dir", str(state_dir)], capture_output=True,
                          text=True, timeout=30)


def test_logout_revokes_this_devices_credential_and_deletes_the_login(relay, tmp_path):
    laptop, desktop = _two_devices(relay, "grace", tmp_path)
    out = _logout(tmp_path / "laptop")
    assert out.returncode == 0 and "revoked at the relay" in out.stdout, out.stderr
    assert credentials.list_logins(tmp_path / "laptop") == []
    assert not _works(laptop), "the logged-out credential still gets tokens"
    assert _works(desktop)
    listed = relay.cli("users", "credentials", "grace").stdout
    assert laptop.credential_id not in listed and desktop.credential_id in listed, listed
    twice = _logout(tmp_path / "laptop")
    assert twice.returncode != 0 and "not logged in" in twice.stderr, twice.stderr


def test_an_expired_credential_is_refused_with_the_way_out(tmp_path):
    chain = Chain(tmp_path, tmp_path / "unused.kubeconfig",
                  relay_args=["--refresh-credential-lifetime", "5", "--access-token-lifetime", "1"])
    try:
        chain.start_relay()
        login_with_code(chain, "heidi", [], tmp_path / "user")
        token = [script("clusterconnect"), "token", "--state-dir", str(tmp_path / "user")]
        first = subprocess.run(token, capture_output=True, text=True, timeout=30)
        assert first.returncode == 0, first.stderr

        def refused() -> subprocess.CompletedProcess | None:
            result = subprocess.run(token, capture_output=True, text=True, timeout=30)
            return result if result.returncode != 0 else None

        result = wait_until(refused, 30, "the refresh credential to expire")
        line = result.stderr.strip().splitlines()[-1]
        assert "refresh credential expired at" in line and "log in again" in line, result.stderr
        listed = chain.cli("users", "credentials", "heidi").stdout
        assert "(expired)" in listed, listed
    finally:
        chain.stop_all()
