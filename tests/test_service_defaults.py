"""Every service started as the README says, with only its required flags, serves on its documented ports.

The relay: users on 8443, agents on 8444, the built-in issuer on 8445 (the issuer's default used to be the
listen port + 1, the agents' port, and the relay exited at once). The auth proxy on 127.0.0.1:8080, where
the agent looks for it by default (it used to require --listen); the client proxy on 127.0.0.1:47011; the
gateway on 8447 (8446 is the relay's --peer-listen).
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess

import pytest
import yaml
from chain import Chain, log_event, port_open, script, wait_until
from kube import kubectl

from clusterconnect.metrics import sample
from clusterconnect.pki import ensure_ca_and_server_cert

RELAY_PORTS = (8443, 8444, 8445)  # users, agents, built-in issuer
AUTHPROXY_PORT = 8080
CLIENT_PROXY_PORT = 47011
# /metrics, /healthz and /readyz on loopback (the client proxy has none unless asked).
METRICS_PORTS = {"relay": 9443, "agent": 9444, "aadproxy": 9445}
GATEWAY_PORT = 8447


def _free(port: int) -> bool:
    with socket.socket() as sock:
        # As a server binds: a listener holds the port, connections of an earlier run in TIME_WAIT do not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def test_relay_starts_with_defaults_on_distinct_ports(tmp_path):
    ports = (8443, 8444, 8445)
    assert all(_free(p) for p in ports), "the relay's default ports are taken on this machine"
    log = tmp_path / "relay-defaults.log"
    with log.open("wb") as out:
        relay = subprocess.Popen([script("clusterconnect-relay"), "serve", "--data-dir", str(tmp_path / "data")],
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: all(port_open(p) for p in ports) or relay.poll() is not None, 30, "the default ports")
        assert relay.poll() is None, log.read_text()
        # The issuer's port speaks HTTPS (discovery), the other two gRPC over TLS: each answers a handshake.
        context = ssl.create_default_context(cafile=str(tmp_path / "data" / "pki" / "ca.crt"))
        context.check_hostname = False
        for port in ports:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                if port == 8444:
                    continue  # the agent port wants a client certificate of the agent CA
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    assert tls.version() is not None
    finally:
        relay.terminate()
        assert relay.wait(15) == 0, log.read_text()


def test_whole_chain_runs_on_defaults_only(tmp_path, monkeypatch, cluster_endpoint_kubeconfig, admin_sa_token):
    """Relay, auth proxy, agent, client proxy and gateway at once, each with its required flags only (so on its
    default ports, side by side): kubectl's request goes through all of them to the apiserver, by both paths."""
    ports = (*RELAY_PORTS, AUTHPROXY_PORT, CLIENT_PROXY_PORT, GATEWAY_PORT, *METRICS_PORTS.values())
    assert len(set(ports)) == len(ports)
    taken = [p for p in ports if not _free(p)]
    assert not taken, f"default ports {taken} are taken on this machine: stop what holds them to run this test"
    # Nothing of this machine's: the defaults under HOME are the test's, and no CLUSTERCONNECT_* setting
    # of the environment stands in for a flag.
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in [n for n in os.environ if n.startswith("CLUSTERCONNECT_")] + ["KUBECONFIG", "XDG_CONFIG_HOME"]:
        monkeypatch.delenv(name, raising=False)

    chain = Chain(tmp_path / "chain", cluster_endpoint_kubeconfig, cluster="defaults", relay_port=RELAY_PORTS[0])
    try:
        relay = chain.spawn("relay", [script("clusterconnect-relay"), "serve", "--data-dir", str(chain.relay_data)],
                            metrics=False)
        wait_until(lambda: log_event(relay.log, "serving"), 30, "relay to serve", relay)
        join = chain.add_cluster()

        authproxy = chain.spawn("aadproxy", [script("clusterconnect-aadproxy"),
                                             "--kubeconfig", str(cluster_endpoint_kubeconfig)], metrics=False)
        listening = wait_until(lambda: log_event(authproxy.log, "listening"), 30, "auth proxy to listen", authproxy)
        assert listening["address"] == f"127.0.0.1:{AUTHPROXY_PORT}"

        # As `clusters add` prints it, less --authproxy, which is the default.
        agent = chain.spawn("agent", [script("clusterconnect-agent"), "--relay", chain.relay_url,
                                      "--cluster", chain.cluster, "--relay-ca-hash", join["relay_ca_hash"]],
                            env={"CLUSTERCONNECT_JOIN_TOKEN": join["join_token"]}, metrics=False)
        wait_until(lambda: log_event(agent.log, "connected to relay"), 30, "agent to connect", agent)
        assert (home / ".local/state/clusterconnect" / f"agent-{chain.cluster}").is_dir()

        out = chain.state_dir / "logs" / "proxy.out"
        with out.open("wb") as handle:
            proxy = chain.spawn("proxy", [script("clusterconnect"), "proxy", chain.cluster, "--relay", chain.relay_url,
                                          "--relay-ca", str(chain.relay_ca), "--token-file", str(admin_sa_token)],
                                stdout=handle.fileno(), metrics=False)
        ready = wait_until(lambda: _line_starting(out, "ready "), 30, "client proxy to be ready", proxy)
        assert f"https://127.0.0.1:{CLIENT_PROXY_PORT}" in ready

        kubeconfig = home / ".kube" / "config"  # the default it merges its context into
        config = yaml.safe_load(kubeconfig.read_text())
        assert [c["cluster"]["server"] for c in config["clusters"]] == [f"https://127.0.0.1:{CLIENT_PROXY_PORT}"]
        assert (home / ".config" / "clusterconnect").is_dir()  # its default --state-dir

        got = kubectl(kubeconfig, "get", "namespace", "clusterconnect-tests", "-o", "name")
        assert got.stdout.strip() == "namespace/clusterconnect-tests"

        gateway_ca, cert, key = ensure_ca_and_server_cert(tmp_path / "gateway-tls", "test CA", ["*.clusters.test"])
        gateway = chain.spawn("gateway", [script("clusterconnect-gateway"), "--relay", chain.relay_url,
                                          "--relay-ca", str(chain.relay_ca), "--cluster-domain", "clusters.test",
                                          "--tls-cert", str(cert), "--tls-key", str(key)])
        serving = wait_until(lambda: log_event(gateway.log, "serving"), 30, "gateway to serve", gateway)
        assert serving["address"] == f"0.0.0.0:{GATEWAY_PORT}"
        through_gateway = tmp_path / "gateway.kubeconfig"
        written = subprocess.run([script("clusterconnect"), "kubeconfig", chain.cluster, "--gateway",
                                  f"https://127.0.0.1:{GATEWAY_PORT}", "--cluster-domain", "clusters.test",
                                  "--gateway-ca", str(gateway_ca), "--token-file", str(admin_sa_token),
                                  "--kubeconfig-out", str(through_gateway)], capture_output=True, text=True, timeout=30)
        assert written.returncode == 0, written.stderr
        got = kubectl(through_gateway, "get", "namespace", "clusterconnect-tests", "-o", "name")
        assert got.stdout.strip() == "namespace/clusterconnect-tests"
        for process in chain.processes.values():
            assert process.alive(), f"{process.name} exited:\n{process.tail()}"
        # Each metrics port serves on its default, the request above counted at each hop.
        for name, port in METRICS_PORTS.items():
            process = chain.processes[name]
            process.metrics_port = port
            prefix = f"clusterconnect_{name}_"
            assert prefix in process.metrics(), f"{name}: no {prefix}* metrics on port {port}"
            assert process.http_get("/readyz") == (200, "ok\n"), name
        assert (sample(chain.processes["relay"].metrics(), "clusterconnect_relay_dials_total", outcome="ok",
                       reason="none") or 0) >= 1
        # README's two commands, as written there.
        dials = subprocess.run("curl -s http://127.0.0.1:9443/metrics | grep clusterconnect_relay_dials_total",
                               shell=True, capture_output=True, text=True, timeout=30)
        assert 'clusterconnect_relay_dials_total{outcome="ok",reason="none"}' in dials.stdout, dials.stdout
        readyz = subprocess.run(["curl", "-s", "http://127.0.0.1:9443/readyz"], capture_output=True, text=True,
                                timeout=30)
        assert readyz.stdout == "ok\n", readyz.stdout
    finally:
        chain.stop_all()
    for process in chain.processes.values():
        assert process.returncode == 0, f"{process.name} ended with {process.returncode}:\n{process.tail()}"


@pytest.mark.parametrize(("argv", "flag", "default"), [
    (["clusterconnect-relay", "serve"], "--listen", "0.0.0.0:8443"),
    (["clusterconnect-relay", "serve"], "--agent-listen", "0.0.0.0:8444"),
    (["clusterconnect-relay", "serve"], "--issuer-listen", "0.0.0.0:8445"),
    (["clusterconnect-aadproxy"], "--listen", f"127.0.0.1:{AUTHPROXY_PORT}"),
    (["clusterconnect-agent"], "--authproxy", f"127.0.0.1:{AUTHPROXY_PORT}"),
    (["clusterconnect", "proxy"], "--port", str(CLIENT_PROXY_PORT)),
    (["clusterconnect-relay", "serve"], "--metrics-listen", "127.0.0.1:9443"),
    (["clusterconnect-agent"], "--metrics-listen", "127.0.0.1:9444"),
    (["clusterconnect-aadproxy"], "--metrics-listen", "127.0.0.1:9445"),
    (["clusterconnect-gateway"], "--listen", f"0.0.0.0:{GATEWAY_PORT}"),
])
def test_help_names_the_default(argv, flag, default):
    """An operator learns each default port from --help, not from the source."""
    helped = subprocess.run([script(argv[0]), *argv[1:], "--help"], capture_output=True, text=True, timeout=30,
                            env={k: v for k, v in os.environ.items() if not k.startswith("CLUSTERCONNECT_")})
    assert helped.returncode == 0, helped.stderr
    # argparse wraps help text: the flag's entry runs from its name to the next flag's.
    entry = " ".join(helped.stdout.split(f"  {flag} ", 1)[1].split("\n  -", 1)[0].split())
    assert default in entry, entry


def test_help_never_shows_a_value_from_the_environment():
    """--help names the built-in defaults; a flag's environment variable may hold a secret (the join token)."""
    canary = "canary-join-token-0123456789"
    helped = subprocess.run([script("clusterconnect-agent"), "--help"], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "CLUSTERCONNECT_JOIN_TOKEN": canary,
                                 "CLUSTERCONNECT_AUTHPROXY": "10.1.2.3:9"})
    assert helped.returncode == 0, helped.stderr
    assert canary not in helped.stdout and "10.1.2.3:9" not in helped.stdout
    assert "(default: 127.0.0.1:8080)" in " ".join(helped.stdout.split())


def _line_starting(path, prefix: str) -> str | None:
    """The client proxy's stdout line for its caller (`ready URL ...`), once written."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return next((line for line in lines if line.startswith(prefix)), None)
