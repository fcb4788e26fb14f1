"""kubeconfig-only access: kubectl -> clusterconnect-gateway -> relay -> agent -> auth proxy -> kube-apiserver.

Real processes (the console scripts), the real kubectl with a kubeconfig written by `clusterconnect kubeconfig`,
the devcluster. What tests/test_tunnel_e2e.py shows through the client proxy (get, watch, exec over WebSocket
and SPDY, logs -f, port-forward checksummed) it also shows through the gateway (its ``tunnel`` fixture runs
every case on both paths); here: what is the gateway's own.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time

import h11
import pytest
import yaml
from chain import Chain, free_port, port_open, script, wait_until
from identities import login_with_code
from kube import LineReader, kubectl, kubectl_popen, stop

from clusterconnect.pki import create_ca

NS = "gateway-tests"
WATCHES = 50


def _ask(chain: Chain, server_name: str | None, request: bytes) -> tuple[h11.Response, bytes]:
    """One request on a TLS connection of its own to the gateway, with ``server_name`` as SNI (None: no SNI);
    the response and its body (h11 parses them)."""
    context = ssl.create_default_context(cafile=str(chain.gateway_ca))
    context.check_hostname = False  # a server name outside *.clusters.test still gets an answer to read
    with socket.create_connection(("127.0.0.1", chain.gateway_port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(request)
            conn = h11.Connection(h11.CLIENT)
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            response, body = None, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(tls.recv(65536))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    assert response is not None
                    return response, body


def _get(path: str, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: dev.clusters.test\r\n{auth}Accept: application/json\r\n\r\n".encode()


def _status(body: bytes) -> dict:
    assert body.count(b"\n") == 0, body  # one line
    status = json.loads(body)
    assert status["kind"] == "Status" and status["status"] == "Failure", status
    return status


# ---- the commands of docs/clients.md, as written -------------------------------------------------------


def test_kubeconfig_commands_as_documented(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERCONNECT_")}
    env |= {"XDG_CONFIG_HOME": str(tmp_path / "config"), "KUBECONFIG": str(tmp_path / "kube" / "config")}
    (tmp_path / "gateway-ca.crt").write_bytes(create_ca("gateway CA").cert_pem)
    printer = tmp_path / "print-token"
    printer.write_text("#!/bin/sh\necho a-token\n")
    printer.chmod(0o700)

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([script("clusterconnect"), *argv], capture_output=True, text=True, timeout=30,
                              cwd=tmp_path, env=env)

    assert run("login", "--token-command", str(printer)).returncode == 0
    written = run("kubeconfig", "prod", "--gateway", "https://clusters.example.com:8447", "--gateway-ca",
                  "gateway-ca.crt")
    assert written.returncode == 0, written.stderr
    config = yaml.safe_load((tmp_path / "kube" / "config").read_text())
    assert config["clusters"][0]["cluster"]["server"] == "https://prod.clusters.example.com:8447"
    assert "tls-server-name" not in config["clusters"][0]["cluster"]
    plugin = config["users"][0]["user"]["exec"]
    assert plugin["args"][:5] == ["token", "--cluster", "prod", "--login", "command"]
    assert config["current-context"] == "prod"

    written = run("kubeconfig", "prod", "--gateway", "https://127.0.0.1:8447", "--cluster-domain", "clusters.test",
                  "--gateway-ca", "gateway-ca.crt")
    assert written.returncode == 0, written.stderr
    [cluster] = yaml.safe_load((tmp_path / "kube" / "config").read_text())["clusters"]  # the context replaced
    assert cluster["cluster"]["server"] == "https://127.0.0.1:8447"
    assert cluster["cluster"]["tls-server-name"] == "prod.clusters.test"
    assert oct((tmp_path / "kube" / "config").stat().st_mode & 0o777) == "0o600"

    refused = run("kubeconfig", "prod", "--gateway", "https://127.0.0.1:8447")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "give --cluster-domain" in refused.stderr, refused.stderr


# ---- without a cluster behind the relay ---------------------------------------------------------------


@pytest.fixture
def lone_gateway(lone_relay):
    lone_relay.start_gateway()
    return lone_relay


def test_no_token_is_401_in_one_line(lone_gateway):
    response, body = _ask(lone_gateway, "dev.clusters.test", _get("/api/v1/namespaces"))
    assert response.status_code == 401
    status = _status(body)
    assert status["reason"] == "Unauthorized" and "no bearer token" in status["message"], status


def test_a_server_name_outside_the_cluster_domain_is_404(lone_gateway):
    for name, says in (("dev.elsewhere.test", "is not a cluster of this gateway"),
                       ("a.dev.clusters.test", "is not a cluster of this gateway"),
                       (None, "no server name (SNI)")):
        response, body = _ask(lone_gateway, name, _get("/api/v1/namespaces", "some-token"))
        assert response.status_code == 404, (name, body)
        status = _status(body)
        assert status["reason"] == "NotFound" and says in status["message"], status


def test_an_unknown_cluster_gets_the_relays_answer(lone_gateway):
    """A well-formed name the relay does not know: the relay answers it as it answers every Dial (no
    enumeration: the same 403 as a cluster whose access list does not admit the caller)."""
    response, body = _ask(lone_gateway, "nope.clusters.test", _get("/api/v1/namespaces", "some-token"))
    assert response.status_code == 403, body
    assert "nope" in _status(body)["message"]


def test_discovery_refusals_are_plain_text_kubectl_shows(lone_gateway):
    """kubectl shows a Status body of a discovery request as "unknown": those get text/plain (as the client proxy's)."""
    response, body = _ask(lone_gateway, "dev.clusters.test", _get("/api"))
    assert response.status_code == 401
    assert dict(response.headers)[b"content-type"].startswith(b"text/plain")
    assert body.decode().count("\n") == 1 and "no bearer token" in body.decode()


def test_a_request_that_is_not_http_is_400(lone_gateway):
    response, body = _ask(lone_gateway, "dev.clusters.test", b"HELLO\r\n\r\n")
    assert response.status_code == 400
    assert "not an HTTP/1.1 request" in _status(body)["message"]


# ---- the devcluster behind it ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(devcluster, admin_sa_token, cluster_endpoint_kubeconfig, tmp_path_factory):
    """relay + auth proxy (token passthrough) + agents of two clusters + gateway; no client proxy at all.

    ``dev`` has an empty access list (the ServiceAccount token passes); ``guarded`` admits group ``admins`` only.
    Yields (chain, kubeconfig of the ServiceAccount through the gateway, state dir of mallory's login)."""
    devcluster.create_namespace(NS)
    state = tmp_path_factory.mktemp("gateway")
    chain = Chain(state, cluster_endpoint_kubeconfig)
    try:
        chain.start_relay()
        chain.add_cluster()
        chain.add_cluster("guarded")
        chain.start_authproxy()
        chain.start_agent()
        chain.start_agent("agent-guarded", cluster="guarded")
        chain.cli("clusters", "grant", "guarded", "--group", "admins")
        mallory = state / "mallory"
        login_with_code(chain, "mallory", ["outsiders"], mallory)
        chain.start_gateway()
        yield chain, chain.gateway_kubeconfig(state / "kubeconfig", token_file=admin_sa_token), mallory
    finally:
        chain.stop_all()


def test_kubeconfig_names_the_cluster_by_tls_server_name(gateway):
    chain, kubeconfig, _ = gateway
    config = yaml.safe_load(kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    assert cluster["server"] == chain.gateway_url
    assert cluster["tls-server-name"] == "dev.clusters.test"
    assert config["current-context"] == "dev"
    assert "proxy" not in chain.processes  # nothing of ours runs on the client side
    assert "gitVersion" in kubectl(kubeconfig, "get", "--raw", "/version").stdout


def test_50_concurrent_watches_through_the_gateway_all_see_an_event(gateway, devcluster):
    _, kubeconfig, _ = gateway
    watchers = [kubectl_popen(kubeconfig, "get", "configmaps", "-n", NS, "-w", "-o", "name",
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for _ in range(WATCHES)]
    try:
        readers = [LineReader(watcher.stdout) for watcher in watchers]
        for reader in readers:  # each initial list arrived: every watch is established
            reader.wait_line(r"kube-root-ca\.crt", 60)
        created = time.monotonic()
        devcluster.kubectl("create", "configmap", "fifty", "-n", NS)
        for reader in readers:
            reader.wait_line(r"^configmap/fifty$", 30)
        print(f"{WATCHES} watches through the gateway saw the event within {time.monotonic() - created:.2f}s")
    finally:
        for watcher in watchers:
            stop(watcher)
        devcluster.kubectl("delete", "configmap", "fifty", "-n", NS, "--ignore-not-found")


def test_a_user_not_on_the_access_list_is_refused_at_the_relay(gateway, tmp_path):
    chain, _, mallory = gateway
    kubeconfig = chain.gateway_kubeconfig(tmp_path / "mallory.kubeconfig", state_dir=mallory, cluster="guarded")
    assert set(yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]) == {"exec", "extensions"}  # no token
    refused = kubectl(kubeconfig, "get", "pods", "-n", NS, check=False)
    assert refused.returncode != 0
    assert refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "Forbidden" in refused.stderr and 'user "mallory" may not reach cluster guarded' in refused.stderr
    gateway_log = chain.processes["gateway"].log.read_text()
    assert "may not reach cluster guarded" in gateway_log  # the relay's own message, passed on
    relay_log = chain.processes["relay"].log.read_text()
    assert '"user": "mallory"' in relay_log and "dial refused" in relay_log



def test_gateways_behind_a_tcp_balancer_each_serve_alone(gateway, tmp_path):
    """Stateless: two gateways behind HAProxy (TCP mode, as a cloud balancer); with either one stopped, the
    other serves every request of the same kubeconfig."""
    if shutil.which("haproxy") is None:
        pytest.skip("needs haproxy (make haproxy)")
    chain, _, _ = gateway
    front = free_port()
    ports = {"gateway-a": free_port(), "gateway-b": free_port()}
    gateways = {name: chain.start_gateway(name, port) for name, port in ports.items()}
    config = tmp_path / "haproxy.cfg"
    config.write_text("\n".join([
        "global", "  maxconn 1000", "defaults", "  mode tcp", "  timeout connect 1s", "  timeout client 1h",
        "  timeout server 1h", "  retries 3", "  option redispatch",
        "frontend gateways", f"  bind 127.0.0.1:{front}", "  default_backend gateways",
        "backend gateways", "  balance roundrobin",
        *[f"  server {name} 127.0.0.1:{port} check inter 300ms fall 2 rise 1" for name, port in ports.items()],
    ]) + "\n")
    balancer = chain.spawn("haproxy-gateways", [shutil.which("haproxy"), "-db", "-f", str(config)])
    try:
        wait_until(lambda: port_open(front), 10, "haproxy to listen", balancer)
        kubeconfig = tmp_path / "balanced.kubeconfig"
        written = subprocess.run([script("clusterconnect"), "kubeconfig", chain.cluster, "--gateway",
                                  f"https://127.0.0.1:{front}", "--cluster-domain", chain.cluster_domain,
                                  "--gateway-ca", str(chain.gateway_ca), "--token-file",
                                  yaml.safe_load((chain.state_dir / "kubeconfig").read_text())["users"][0]["user"]
                                  ["tokenFile"], "--kubeconfig-out", str(kubeconfig)],
                                 capture_output=True, text=True, timeout=30)
        assert written.returncode == 0, written.stderr
        for stopped, serving in (("gateway-a", "gateway-b"), ("gateway-b", "gateway-a")):
            gateways[stopped].stop()
            for _ in range(5):  # roundrobin would send every other connection to the stopped one
                assert kubectl(kubeconfig, "get", "namespace", NS, "-o", "name").stdout.strip() == f"namespace/{NS}"
            assert gateways[serving].alive()
            gateways[stopped] = chain.start_gateway(stopped, ports[stopped])
    finally:
        balancer.stop()
        for process in gateways.values():
            process.stop()
