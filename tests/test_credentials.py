"""The credential store (clusterconnect.credentials): typed logins, read from files in the JSON format
the store has always written, and written back in it."""

from __future__ import annotations

import json
import sys
import time

import pytest

from clusterconnect import credentials
from clusterconnect.credentials import BuiltinLogin, CommandLogin, LoginError, OidcGrant, OidcLogin
from clusterconnect.errors import ClusterConnectError

LATER = int(time.time()) + 3600

# Written by the store before its logins were typed (clientproxy/tokens.py): what users have on disk.
OLD_FILES = {
    "relay-example.com-8443": {
        "kind": "relay", "relay": "https://relay.example.com:8443", "relay_ca": None,
        "refresh_credential": "rc-secret", "username": "alice", "issuer": "https://relay.example.com:8444",
        "audience": "clusterconnect", "access_token": "cached-relay", "expires_unix": LATER,
        "issued_unix": LATER - 600,
    },
    "oidc-device": {
        "kind": "oidc", "issuer": "https://login.example.com", "issuer_ca": "PEM", "client_id": "kubectl",
        "client_secret": None, "token_endpoint": "https://login.example.com/token", "refresh_token": "rt",
        "access_token": "cached-device", "expires_unix": LATER, "issued_unix": LATER - 600,
    },
    "oidc-ci": {
        "kind": "oidc", "grant": "client_credentials", "issuer": "https://login.example.com", "issuer_ca": None,
        "client_id": "ci", "client_secret": "s3cret", "scope": "", "audience": "clusterconnect",
        "token_endpoint": "https://login.example.com/token", "access_token": "cached-ci",
        "expires_unix": LATER, "issued_unix": LATER - 600,
    },
    "command": {"kind": "command", "command": "az account get-access-token -o json",
                "access_token": "cached-command", "expires_unix": LATER, "issued_unix": LATER - 600},
}


def _write_old(state_dir, name: str, document: dict) -> None:
    directory = state_dir / "credentials"
    directory.mkdir(mode=0o700, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(document, indent=1))


def test_files_written_before_typed_logins_still_load(tmp_path):
    for name, document in OLD_FILES.items():
        _write_old(tmp_path, name, document)
    assert credentials.list_logins(tmp_path) == sorted(OLD_FILES)

    relay = credentials.load(tmp_path, "relay-example.com-8443")
    assert isinstance(relay, BuiltinLogin)
    assert (relay.relay, relay.refresh_credential, relay.username) == ("https://relay.example.com:8443", "rc-secret",
                                                                       "alice")
    device = credentials.load(tmp_path, "oidc-device")
    assert isinstance(device, OidcLogin) and device.grant is OidcGrant.DEVICE_CODE and device.refresh_token == "rt"
    ci = credentials.load(tmp_path, "oidc-ci")
    assert isinstance(ci, OidcLogin) and ci.grant is OidcGrant.CLIENT_CREDENTIALS and ci.client_secret == "s3cret"
    command = credentials.load(tmp_path, "command")
    assert command == CommandLogin(command="az account get-access-token -o json", access_token="cached-command",
                                   expires_unix=LATER, issued_unix=LATER - 600)
    # Their cached tokens are still good: get_token answers from the file, reaching no issuer.
    for name, document in OLD_FILES.items():
        assert credentials.get_token(tmp_path, name) == (document["access_token"], LATER)


def test_saved_logins_keep_the_on_disk_format(tmp_path):
    for name, document in OLD_FILES.items():
        _write_old(tmp_path, name, document)
        credentials.save(tmp_path, name, credentials.load(tmp_path, name))
        written = json.loads((tmp_path / "credentials" / f"{name}.json").read_text())
        expected = {"grant": "device_code", **document} if name == "oidc-device" else document
        # Every key the old store read is there with its value; fields the old file lacked are null.
        assert {key: value for key, value in written.items() if key in expected} == expected
        assert all(written[key] is None for key in written.keys() - expected.keys()), written
        assert (tmp_path / "credentials" / f"{name}.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("document", "message"), [
    ({"kind": "kerberos"}, "unknown kind 'kerberos'"),
    ({"command": "x"}, "unknown kind None"),
    ({"kind": "relay", "relay": "https://r"}, "lacks refresh_credential, relay_ca"),
    ({**OLD_FILES["oidc-ci"], "grant": "password"}, "unknown grant 'password'"),
    (["not", "an", "object"], "not a JSON object"),
])
def test_unusable_files_are_a_login_error_saying_log_in_again(tmp_path, document, message):
    _write_old(tmp_path, "bad", document)  # type: ignore[arg-type]  # on purpose: not a login
    with pytest.raises(LoginError) as raised:
        credentials.get_token(tmp_path, "bad")
    assert message in str(raised.value) and "log in again" in str(raised.value)
    assert isinstance(raised.value, ClusterConnectError) and raised.value.exit_code == 1


def test_an_expired_command_token_is_refreshed_and_saved(tmp_path):
    script = tmp_path / "print-token"
    script.write_text(f"#!{sys.executable}\nprint('fresh-token')\n")
    script.chmod(0o755)
    credentials.save(tmp_path, "cmd", CommandLogin(command=str(script), access_token="old", expires_unix=1,
                                                   issued_unix=0))
    token, expires = credentials.get_token(tmp_path, "cmd")
    assert token == "fresh-token" and expires > time.time()
    saved = credentials.load(tmp_path, "cmd")
    assert isinstance(saved, CommandLogin) and saved.access_token == "fresh-token"


def test_login_names_cannot_leave_the_credentials_directory(tmp_path):
    with pytest.raises(LoginError, match="invalid login name"):
        credentials.load(tmp_path, "../escape")
