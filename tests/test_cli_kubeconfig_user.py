"""`clusterconnect proxy CLUSTER --kubeconfig-user NAME`: the proxy wraps an existing kubeconfig user.

A user that authenticates with a client certificate cannot: TLS from kubectl ends at the client proxy,
so the certificate would never reach the cluster (kubectl would get "401 no Authorization header").
The proxy refuses such a user with one line saying what to use instead, exit code 2, before it writes
anything (the kubeconfig stays byte for byte as it was, no local CA is made).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from chain import script, wait_until
from kube import kubectl

from clusterconnect.clientproxy import kubeconfig
from clusterconnect.clientproxy.kubeconfig import UserNotWrappable, WrappedCredential


def _kubeconfig(path, users: dict[str, dict]) -> bytes:
    document = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "direct", "cluster": {"server": "https://10.0.0.1:6443"}}],
        "users": [{"name": name, "user": user} for name, user in users.items()],
        "contexts": [{"name": "direct", "context": {"cluster": "direct", "user": next(iter(users))}}],
        "current-context": "direct",
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path.read_bytes()


def _proxy(tmp_path, out, user: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [script("clusterconnect"), "proxy", "dev", "--relay", "https://127.0.0.1:1", "--kubeconfig-user", user,
         "--kubeconfig-out", str(out), "--state-dir", str(tmp_path / "state"), "--port", "0"],
        capture_output=True, text=True, timeout=30,
    )


@pytest.mark.parametrize("certificate", [
    {"client-certificate-data": "Q0VSVA==", "client-key-data": "S0VZ"},
    {"client-certificate": "/etc/admin.crt", "client-key": "/etc/admin.key"},
], ids=["data", "files"])
def test_a_client_certificate_user_is_refused_with_one_line_and_nothing_written(tmp_path, certificate):
    out = tmp_path / "config"
    before = _kubeconfig(out, {"admin": certificate})
    result = _proxy(tmp_path, out, "admin")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: kubeconfig user 'admin' authenticates with a client certificate"), lines[0]
    for alternative in ("--token", "clusterconnect login", "users add"):
        assert alternative in lines[0]
    assert result.stdout == ""
    assert out.read_bytes() == before
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(("user", "message"), [
    ({"exec": {"command": "az"}}, "exec plugin"),
    ({"username": "u", "password": "p"}, "no bearer token"),
], ids=["exec", "basic-auth"])
def test_other_users_without_a_bearer_token_are_refused_too(tmp_path, user, message):
    out = tmp_path / "config"
    before = _kubeconfig(out, {"someone": user})
    result = _proxy(tmp_path, out, "someone")
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1
    assert out.read_bytes() == before


def test_an_unknown_user_is_one_line(tmp_path):
    out = tmp_path / "config"
    _kubeconfig(out, {"admin": {"token": "t"}})
    result = _proxy(tmp_path, out, "nobody")
    assert result.returncode == 2 and result.stderr.strip() == f"error: kubeconfig {out} has no user 'nobody'"


def test_token_users_are_wrapped_with_their_token_or_token_file(tmp_path):
    out = tmp_path / "config"
    _kubeconfig(out, {"a": {"token": "tok"}, "b": {"tokenFile": "sa.token"}, "c": {"tokenFile": "/abs/sa.token"},
                      "both": {"token": "tok", "client-certificate-data": "Q0VSVA=="}})
    assert kubeconfig.wrapped_credential([out], "a") == WrappedCredential(token="tok")
    assert kubeconfig.wrapped_credential([out], "b") == WrappedCredential(token_file=tmp_path / "sa.token")
    assert kubeconfig.wrapped_credential([out], "c") == WrappedCredential(token_file=Path("/abs/sa.token"))
    # kubectl sends the token as well as the certificate: the token crosses the tunnel, so it may be wrapped
    assert kubeconfig.wrapped_credential([out], "both") == WrappedCredential(token="tok")
    with pytest.raises(UserNotWrappable):
        kubeconfig.wrapped_credential([tmp_path / "absent"], "a")


def test_a_wrapped_token_user_reaches_the_cluster_and_stays_as_it_was(chain, admin_sa_token, tmp_path):
    tunnel, _ = chain
    out = tmp_path / "config"
    _kubeconfig(out, {"sa": {"tokenFile": str(admin_sa_token)}})
    users_before = yaml.safe_load(out.read_text())["users"]
    process = tunnel.spawn("proxy-wrapped", [
        script("clusterconnect"), "proxy", "dev", "--relay", tunnel.relay_url, "--relay-ca", str(tunnel.relay_ca),
        "--kubeconfig-user", "sa", "--kubeconfig-out", str(out), "--port", "0",
        "--state-dir", str(tmp_path / "state")], stdout=subprocess.PIPE)
    try:
        assert process.popen.stdout is not None
        ready = process.popen.stdout.readline().decode()
        assert ready.startswith("ready "), process.tail()
        config = yaml.safe_load(out.read_text())
        # The wrapped user as it was; the context's user is our own: the same token file, plus the
        # client certificate that opens the proxy's port.
        assert config["users"][:1] == users_before
        context = kubeconfig.context_name(tunnel.relay_url, "dev")  # 127.0.0.1:PORT-dev
        ours = {u["name"]: u["user"] for u in config["users"]}[f"clusterconnect-{context}"]
        assert ours["tokenFile"] == str(admin_sa_token.resolve())
        assert ours["client-certificate-data"] and ours["client-key-data"]
        written = {c["name"]: c["context"] for c in config["contexts"]}[context]
        assert (written["cluster"], written["user"]) == (context, f"clusterconnect-{context}")
        assert config["current-context"] == context and f" context={context} " in ready
        wait_until(lambda: kubectl(out, "get", "--raw", "/version", check=False, timeout=10).returncode == 0, 10,
                   "kubectl to work through the wrapped user")
    finally:
        process.stop()
