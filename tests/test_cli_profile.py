"""The profile (cli/profile.py): `clusterconnect login --relay URL --relay-ca CA --code -` remembers the relay
and its CA (mode 600, no token), so later commands need neither flag; flags and their environment win."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess

from chain import script
from identities import login_with_code

from clusterconnect.cli import profile


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([script("clusterconnect"), *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **env})


def test_login_remembers_the_relay_and_its_ca(lone_relay, tmp_path):
    state = tmp_path / "user"
    lone_relay.add_cluster("alpha")
    login_with_code(lone_relay, "alice", ["dev"], state)
    profile = json.loads((state / "profile.json").read_text())
    assert profile["relay"] == lone_relay.relay_url and profile["login"].startswith("relay-")
    assert (state / "profile-relay-ca.pem").read_bytes() == lone_relay.relay_ca.read_bytes()
    for name in ("profile.json", "profile-relay-ca.pem"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
    saved = json.loads((state / "credentials" / f"{profile['login']}.json").read_text())
    secrets = [value for key, value in saved.items()
               if ("credential" in key or "token" in key) and isinstance(value, str) and len(value) > 8]
    assert secrets and not any(secret in (state / "profile.json").read_text() for secret in secrets)

    env = {"CLUSTERCONNECT_STATE_DIR": str(state)}
    admin = ("--admin-credential", str(lone_relay.admin_credential))
    listed = _run("clusters", "list", "-o", "json", *admin, env=env)  # no --relay, no --relay-ca
    assert listed.returncode == 0, listed.stderr
    assert [c["name"] for c in json.loads(listed.stdout)] == ["alpha"]

    # A flag wins over the profile, and so does its environment variable.
    for args, extra in ((("--relay", "https://127.0.0.1:1"), {}), ((), {"CLUSTERCONNECT_RELAY": "https://127.0.0.1:1"})):
        other = _run("clusters", "list", *args, *admin, env={**env, **extra})
        assert other.returncode == 1 and len(other.stderr.splitlines()) == 1, other.stderr
        assert "127.0.0.1:1" in other.stderr


def test_without_a_profile_the_relay_is_asked_for_in_one_line(tmp_path, lone_relay):
    result = _run("clusters", "list", "--admin-credential", str(lone_relay.admin_credential),
                  env={"CLUSTERCONNECT_STATE_DIR": str(tmp_path / "empty")})
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: --relay URL is needed") and len(result.stderr.splitlines()) == 1


def test_logout_forgets_the_relay_and_a_damaged_profile_is_one_line(lone_relay, tmp_path):
    state = tmp_path / "user"
    login_with_code(lone_relay, "bob", ["dev"], state)
    name = json.loads((state / "profile.json").read_text())["login"]
    out = _run("logout", "--state-dir", str(state), env={})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("; the relay it remembered is forgotten")
    assert not (state / "profile.json").exists() and not (state / "profile-relay-ca.pem").exists()
    assert name not in out.stderr

    (state / "profile.json").write_text('{"relay": 1}')
    damaged = _run("clusters", "list", "--admin-credential", str(lone_relay.admin_credential),
                   env={"CLUSTERCONNECT_STATE_DIR": str(state)})
    assert damaged.returncode == 1 and damaged.stderr == (
        f"error: the profile {state / 'profile.json'} is not one clusterconnect wrote (log in again with"
        " `clusterconnect login --relay URL ...`)\n")


def test_the_profiles_ca_vouches_for_its_relay_only(tmp_path):
    profile.save(tmp_path, "https://relay-a:8443", b"CA-A", "relay-a")
    for relay, ca in (("https://relay-a:8443", tmp_path / "profile-relay-ca.pem"), ("https://relay-b:8443", None)):
        args = argparse.Namespace(relay=relay, relay_ca=None)
        profile.apply(args, tmp_path)
        assert args.relay_ca == ca
    args = argparse.Namespace(relay=None, relay_ca=None)
    assert profile.apply(args, tmp_path).login == "relay-a" and args.relay == "https://relay-a:8443"
