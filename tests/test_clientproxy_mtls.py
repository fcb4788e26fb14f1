"""The client proxy's port is the kubeconfig holder's alone (issue #11, point 1, second bullet), and a
client that sends no request head in time is dropped (point 6, the client proxy's part).

127.0.0.1 is open to every local user. The proxy demands a client certificate of its own client CA
(mutual TLS), written into the kubeconfig it generates (mode 600): another local user, with a token
of their own, cannot use the port at all. Real processes (the session's chain, and proxies of our
own next to it), real TLS, the real kubectl; the apiserver's audit log judges what reached it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import socket
import ssl
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from chain import STDOUT_SUFFIX, script, wait_until
from https_client import client_certificate, load_client_certificate
from kube import kubectl
from silent_stream import Blocks

from clusterconnect.clientproxy.request_head import FirstRequestHead, RequestHeadTimeout
from clusterconnect.pki import KeyPair, create_ca, issue_client_cert

NS = "clusterconnect-tests"


def _current(kubeconfig: Path) -> tuple[dict, dict]:
    """The cluster and user entries of the kubeconfig's current context."""
    config = yaml.safe_load(kubeconfig.read_text())
    context = next(c for c in config["contexts"] if c["name"] == config["current-context"])["context"]
    cluster = next(c for c in config["clusters"] if c["name"] == context["cluster"])["cluster"]
    user = next(u for u in config["users"] if u["name"] == context["user"])["user"]
    return cluster, user


def _port(kubeconfig: Path) -> int:
    return int(_current(kubeconfig)[0]["server"].rsplit(":", 1)[1])


def _context(kubeconfig: Path, certificate: tuple[bytes, bytes] | None,
             maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED) -> ssl.SSLContext:
    """A client context that trusts the proxy (as kubectl does), with ``certificate`` or none."""
    cluster, _ = _current(kubeconfig)
    context = ssl.create_default_context(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
    context.maximum_version = maximum
    if certificate is not None:
        load_client_certificate(context, *certificate)
    return context


def _exchange(port: int, context: ssl.SSLContext, request: bytes) -> bytes | tuple[str, ssl.SSLError]:
    """Send ``request`` and read the response head: its bytes, or where TLS failed ("handshake": the
    client's handshake itself; "request": TLS 1.3, where the client's side of the handshake ends
    before the server checked its certificate and the server's refusal arrives as the first read)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        try:
            tls = context.wrap_socket(raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False)
        except ssl.SSLError as exc:
            return "handshake", exc
        with tls:
            try:
                tls.sendall(request)
                while chunk := tls.recv(65536):
                    received += chunk
                    if b"\r\n\r\n" in received:
                        break
            except ssl.SSLError as exc:
                return "request", exc
    return received


def _get(path: str, token: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n").encode()


def _seen(devcluster, marker: str) -> list[dict]:
    return [e for e in devcluster.audit_events() if marker in e.get("requestURI", "")]


@pytest.fixture(scope="module")
def intruder_token(devcluster) -> str:
    """Another local user's own credential: a ServiceAccount token the apiserver would accept."""
    devcluster.create_namespace(NS)
    devcluster.create_service_account(NS, "intruder")
    return devcluster.token(NS, "intruder")


@pytest.mark.parametrize("tls_version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def test_without_the_kubeconfigs_certificate_the_handshake_is_refused_and_nothing_reaches_the_cluster(
        chain, devcluster, intruder_token, tmp_path, tls_version):
    tunnel, kubeconfig = chain
    port = _port(kubeconfig)
    marker = f"intruder-{secrets.token_hex(4)}"
    request = _get(f"/api/v1/namespaces/default?{marker}=1", intruder_token)

    # No certificate at all; one of a CA of our own making; one signed by the proxy's serving CA
    # (trusted by kubectl, but not the key to the door).
    tls = tunnel.state_dir / "proxy-state" / "tls"
    foreign = issue_client_cert(create_ca("someone else's CA"), "intruder")
    by_serving_ca = issue_client_cert(KeyPair((tls / "ca.crt").read_bytes(), (tls / "ca.key").read_bytes()), "intruder")
    # TLS 1.2: the handshake fails. TLS 1.3: the client's side of the handshake ends before the server
    # checked its certificate; the refusal ends the connection before any answer to the request.
    # (asyncio drops the connection without sending the TLS alert, hence an EOF rather than a reason.)
    stage = "handshake" if tls_version == ssl.TLSVersion.TLSv1_2 else "request"
    for certificate in (None, (foreign.cert_pem, foreign.key_pem), (by_serving_ca.cert_pem, by_serving_ca.key_pem)):
        outcome = _exchange(port, _context(kubeconfig, certificate, tls_version), request)
        assert isinstance(outcome, tuple), f"the proxy answered a client without its certificate: {outcome!r}"
        assert outcome[0] == stage, outcome

    # kubectl with the intruder's own token and no certificate: refused at the handshake.
    _, user = _current(kubeconfig)
    config = yaml.safe_load(kubeconfig.read_text())
    for entry in config["users"]:
        entry["user"] = {"token": intruder_token}
    without = tmp_path / "without-certificate.kubeconfig"
    without.write_text(yaml.safe_dump(config))
    refused = kubectl(without, "get", "--raw", f"/api/v1/namespaces/default?{marker}=2", check=False, timeout=30)
    assert refused.returncode != 0, refused.stdout
    # (EOF or a reset, as the TLS version and timing have it)
    assert refused.stderr.startswith("Unable to connect to the server: "), refused.stderr

    # Canary: the holder of the kubeconfig gets through, and the audit log shows it.
    canary = f"holder-{secrets.token_hex(4)}"
    kubectl(kubeconfig, "get", "--raw", f"/api/v1/namespaces/default?{canary}=1", timeout=30)
    wait_until(lambda: _seen(devcluster, canary), 30, "the holder's request in the audit log")
    assert not _seen(devcluster, marker), "a request without the client certificate reached the apiserver"
    intruder = f"system:serviceaccount:{NS}:intruder"
    assert not [e for e in devcluster.audit_events() if e.get("user", {}).get("username") == intruder]
    assert user["client-certificate-data"] and user["client-key-data"]


def test_the_kubeconfig_and_the_keys_are_private_whatever_the_umask_and_printing_includes_the_certificate(
        chain, admin_sa_token, tmp_path):
    tunnel, _ = chain
    state, kubeconfig = tmp_path / "state", tmp_path / "config"
    previous = os.umask(0)  # the children inherit it
    try:
        with contextlib.ExitStack() as stop:
            written, _ = tunnel.start_proxy(admin_sa_token, kubeconfig, name="proxy-umask", state_dir=state)
            stop.callback(written.stop)
            printed, _ = tunnel.start_proxy(admin_sa_token, Path("-"), name="proxy-print", state_dir=tmp_path / "print")
            stop.callback(printed.stop)
            os.umask(previous)

            assert stat.S_IMODE(kubeconfig.stat().st_mode) == 0o600
            for key in ("ca.key", "tls.key", "client-ca.key", "client.key"):
                assert stat.S_IMODE((state / "tls" / key).stat().st_mode) == 0o600, key
            _, user = _current(kubeconfig)
            assert client_certificate(user) == ((state / "tls" / "client.crt").read_bytes(),
                                                (state / "tls" / "client.key").read_bytes())
            assert kubectl(kubeconfig, "get", "--raw", "/version", timeout=30).returncode == 0

            out = (tunnel.state_dir / "logs" / f"proxy-print{STDOUT_SUFFIX}").read_text()
            document = yaml.safe_load(out[:out.index("\nready ")])
            user = document["users"][0]["user"]
            assert user["tokenFile"] and user["client-certificate-data"] and user["client-key-data"]
    finally:
        os.umask(previous)


# ---- point 6: the first request's head has a deadline -------------------------------------------------


@pytest.fixture
def impatient_proxy(chain, admin_sa_token, tmp_path, monkeypatch):
    """A proxy of our own with a 1 s request-head deadline, logging at info."""
    tunnel, _ = chain
    monkeypatch.setenv("CLUSTERCONNECT_REQUEST_HEAD_TIMEOUT", "1")
    monkeypatch.setenv("CLUSTERCONNECT_LOG_LEVEL", "info")
    kubeconfig = tmp_path / "config"
    process, _ = tunnel.start_proxy(admin_sa_token, kubeconfig, name="proxy-impatient", state_dir=tmp_path / "state")
    try:
        yield process, kubeconfig
    finally:
        process.stop()


def _connect(kubeconfig: Path) -> ssl.SSLSocket:
    _, user = _current(kubeconfig)
    raw = socket.create_connection(("127.0.0.1", _port(kubeconfig)), timeout=20)
    return _context(kubeconfig, client_certificate(user)).wrap_socket(raw, server_hostname="127.0.0.1")


def _dropped(log: Path, reason: str) -> list[dict]:
    """The proxy's "connection dropped" lines whose reason contains ``reason``."""
    lines = [json.loads(line) for line in log.read_text(errors="replace").splitlines()
             if line.startswith("{") and '"event": "connection dropped"' in line]
    return [line for line in lines if reason in line.get("reason", "")]


def _until_closed(tls: ssl.SSLSocket) -> bytes:
    received = b""
    while chunk := tls.recv(65536):
        received += chunk
    return received


def test_a_connection_that_sends_no_request_is_dropped_and_a_stalled_head_gets_408(impatient_proxy, admin_sa_token):
    process, kubeconfig = impatient_proxy
    token = admin_sa_token.read_text().strip()
    with _connect(kubeconfig) as busy, _connect(kubeconfig) as silent, _connect(kubeconfig) as stalled:
        # One full request at once, and the connection kept: after the deadline it still serves.
        busy.sendall(f"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        stalled.sendall(b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        first = busy.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first
        started = time.monotonic()
        assert _until_closed(silent) == b"", "an unused connection gets no response, only its end"
        answer = _until_closed(stalled)
        elapsed = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer
        assert b"no complete request head within 1s" in answer
        assert elapsed < 10, f"dropped only after {elapsed:.1f}s"
        # Canary: the deadline passed for the busy connection too (it was opened first), and it still works.
        busy.sendall(f"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                     "Connection: close\r\n\r\n".encode())
        assert (first + _until_closed(busy)).count(b"HTTP/1.1 200 OK\r\n") == 2
    dropped = wait_until(lambda: _dropped(process.log, "no complete request head within 1s"), 10,
                         "the drop to be logged")
    assert len(dropped) == 2, dropped  # the silent connection and the stalled one
    # Without the certificate: one line saying why (kubectl itself only shows an EOF).
    assert isinstance(_exchange(_port(kubeconfig), _context(kubeconfig, None), _get("/version", token)), tuple)
    wait_until(lambda: _dropped(process.log, "no TLS handshake"), 20, "the refused handshake to be logged")
    assert token not in process.log.read_text()
    # kubectl is never too slow for it.
    assert kubectl(kubeconfig, "get", "--raw", "/version", timeout=30).returncode == 0


def test_the_deadline_ends_at_the_blank_line_even_split_across_blocks():
    async def main() -> None:
        head = FirstRequestHead(Blocks(b"GET / HTTP/1.1\r\nHost: x\r\n\r", b"\nbody"), timeout=0.05)
        assert await head.receive() == b"GET / HTTP/1.1\r\nHost: x\r\n\r"
        assert await head.receive() == b"\nbody"
        # Silent after the head: waits past the deadline without RequestHeadTimeout.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(head.receive(), 0.3)

        stalled = FirstRequestHead(Blocks(b"GET / HTTP/1.1\r\n\r"), timeout=0.05)
        await stalled.receive()
        with pytest.raises(RequestHeadTimeout, match=r"within 0.05s .*\(17 bytes received\)"):
            await asyncio.wait_for(stalled.receive(), 5)

    asyncio.run(main())


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_request_head_timeout_that_is_no_deadline_is_refused_in_one_line(tmp_path, value):
    result = subprocess.run([script("clusterconnect"), "proxy", "dev", "--relay", "https://127.0.0.1:1", "--token", "t",
                             "--state-dir", str(tmp_path), "--request-head-timeout", value],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "--request-head-timeout must be a positive number of seconds" in result.stderr
    assert not (tmp_path / "tls").exists()
