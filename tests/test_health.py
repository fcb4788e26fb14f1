"""Readiness that tells the truth, per service: /readyz fails while the service's dependency is gone and
recovers with it; /healthz stays up (the process is alive); grpc.health.v1 follows the readiness.

- relay: its store (etcd, every member stopped with SIGSTOP) — and a killed agent shows in its metrics;
- agent and client proxy: the relay (stopped, then started again on the same ports);
- auth proxy: the apiserver (reached through a TCP forwarder that is not there, then is).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from contextlib import closing, contextmanager, suppress
from pathlib import Path

import grpc
import pytest
import yaml
from chain import Chain, free_port, port_open, script, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from replicas import empty_store, etcd_flags

from clusterconnect.metrics import sample
from clusterconnect.relay.storage.sealing import SealingKey


def _ready(process) -> tuple[int, str]:
    return process.http_get("/readyz")


def _wait_ready(process, ready: bool, what: str, timeout: float = 30) -> str:
    def answered() -> str | None:
        status, body = _ready(process)
        return body if (status == 200) == ready else None

    return wait_until(answered, timeout, what, process, interval=0.2)


@pytest.fixture(scope="module")
def own_chain(devcluster, admin_sa_token, cluster_endpoint_kubeconfig, tmp_path_factory):
    """A chain of its own: these tests kill and restart its processes."""
    chain = Chain(tmp_path_factory.mktemp("health"), cluster_endpoint_kubeconfig)
    with chain.running(admin_sa_token, chain.state_dir / "kubeconfig"):
        yield chain


def test_a_killed_agent_leaves_the_relays_metrics_and_its_readiness(own_chain):
    chain = own_chain
    relay, agent = chain.processes["relay"], chain.processes["agent"]
    _wait_ready(agent, True, "the agent to be ready")
    metrics = relay.metrics()
    assert sample(metrics, "clusterconnect_relay_agent_sessions") == 1
    ended = sample(metrics, "clusterconnect_relay_agent_sessions_ended_total", reason="agent_closed") or 0
    agent.popen.send_signal(signal.SIGKILL)
    agent.popen.wait()
    # The kernel closes the dead agent's connection: the relay ends its session at once (no heartbeat wait).
    wait_until(lambda: sample(relay.metrics(), "clusterconnect_relay_agent_sessions") == 0, 10,
               "the relay's agent sessions to drop to 0", relay)
    now = relay.metrics()
    gone = sum(sample(now, "clusterconnect_relay_agent_sessions_ended_total", reason=reason) or 0
               for reason in ("agent_closed", "disconnected"))
    assert gone >= ended + 1
    restarted = chain.start_agent()
    assert _wait_ready(restarted, True, "the restarted agent to be ready") == "ok\n"
    assert sample(relay.metrics(), "clusterconnect_relay_agent_sessions") == 1


def test_agent_and_client_proxy_are_not_ready_without_the_relay(own_chain):
    chain = own_chain
    agent, proxy = chain.processes["agent"], chain.processes["proxy"]
    for process in (agent, proxy):
        _wait_ready(process, True, f"{process.name} to be ready")
    chain.processes["relay"].stop()
    agent_said = _wait_ready(agent, False, "the agent to be unready")
    assert "no control stream to the relay" in agent_said, agent_said
    proxy_said = _wait_ready(proxy, False, "the client proxy to be unready")
    assert proxy_said.startswith("not ready: relay:"), proxy_said
    for process in (agent, proxy):
        assert process.http_get("/healthz") == (200, "ok\n")  # alive all along: nothing to restart
    chain.start_relay()  # the same ports and data
    for process in (agent, proxy):
        _wait_ready(process, True, f"{process.name} to be ready again", timeout=45)


def _health(target: str, credentials: grpc.ChannelCredentials | None) -> int:
    async def check() -> int:
        channel = (grpc.aio.secure_channel(target, credentials) if credentials is not None
                   else grpc.aio.insecure_channel(target))
        async with channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return int(answer.status)

    return asyncio.run(check())


def test_grpc_health_on_the_relay_and_the_auth_proxy(own_chain):
    chain = own_chain
    _wait_ready(chain.processes["relay"], True, "the relay to be ready")
    credentials = grpc.ssl_channel_credentials(root_certificates=chain.relay_ca.read_bytes())

    def serving(target: str, creds: grpc.ChannelCredentials | None) -> bool:
        return _health(target, creds) == health_pb2.HealthCheckResponse.SERVING

    wait_until(lambda: serving(f"localhost:{chain.relay_port}", credentials), 15, "the relay's gRPC health",
               ignoring=(grpc.aio.AioRpcError,))
    wait_until(lambda: serving(f"127.0.0.1:{chain.authproxy_port}", None), 15, "the auth proxy's gRPC health",
               ignoring=(grpc.aio.AioRpcError,))


# -- the auth proxy and its apiserver ------------------------------------------------------------------


@contextmanager
def tcp_forwarder(port: int, target: tuple[str, int]):
    """A plain TCP forwarder on 127.0.0.1:``port`` to ``target`` while the block runs (the link to the
    apiserver, there or not); its connections end with it."""
    listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
    listener.settimeout(0.2)
    stopping = threading.Event()
    sockets: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def accept() -> None:
        while not stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(target)
            sockets.extend((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=pipe, args=(a, b), daemon=True)
                thread.start()
                threads.append(thread)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield
    finally:
        stopping.set()
        acceptor.join(5)
        listener.close()
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in threads:
            thread.join(5)


def test_auth_proxy_is_ready_only_while_the_apiserver_answers(cluster_endpoint_kubeconfig, tmp_path):
    config = yaml.safe_load(cluster_endpoint_kubeconfig.read_text())
    server = config["clusters"][0]["cluster"]["server"]
    host, port = server.removeprefix("https://").rsplit(":", 1)
    link = free_port()
    # The same apiserver (its certificate names 127.0.0.1), through a port we control.
    config["clusters"][0]["cluster"]["server"] = f"https://{host}:{link}"
    kubeconfig = tmp_path / "through-link.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    chain = Chain(tmp_path / "chain", Path("/nonexistent"))
    listen = free_port()
    authproxy = chain.spawn("aadproxy", [script("clusterconnect-aadproxy"), "--listen", f"127.0.0.1:{listen}",
                                         "--kubeconfig", str(kubeconfig)])
    try:
        # Its metrics port opens a moment after the gRPC one (refused until then: CI saw it).
        wait_until(lambda: port_open(listen) and port_open(authproxy.metrics_port), 30, "the auth proxy to listen",
                   authproxy)
        said = _wait_ready(authproxy, False, "the auth proxy to say it is not ready")
        assert said.startswith("not ready: apiserver: cannot reach the apiserver"), said
        with tcp_forwarder(link, (host, int(port))):
            assert _wait_ready(authproxy, True, "the auth proxy to be ready with the apiserver") == "ok\n"
        said = _wait_ready(authproxy, False, "the auth proxy to be unready once the apiserver is gone again")
        assert "apiserver" in said, said
        assert authproxy.http_get("/healthz") == (200, "ok\n")
    finally:
        chain.stop_all()
    assert authproxy.returncode == 0, authproxy.tail()


# -- the relay and its store ----------------------------------------------------------------------------


def test_relay_is_not_ready_while_etcd_does_not_answer(etcd_cluster, tmp_path):
    empty_store(etcd_cluster)
    sealing = tmp_path / "sealing.key"
    SealingKey.load_or_create(sealing)
    chain = Chain(tmp_path / "relay", Path("/nonexistent"), relay_args=etcd_flags(etcd_cluster, sealing))
    members = [m.process for m in etcd_cluster.members if m.process is not None]
    try:
        relay = chain.start_relay()
        _wait_ready(relay, True, "the relay to be ready on etcd")
        for member in members:
            member.popen.send_signal(signal.SIGSTOP)
        try:
            said = _wait_ready(relay, False, "the relay to be unready while etcd is stopped", timeout=20)
            assert said.startswith("not ready: store:"), said
            assert relay.http_get("/healthz") == (200, "ok\n")
        finally:
            for member in members:
                member.popen.send_signal(signal.SIGCONT)
        _wait_ready(relay, True, "the relay to be ready again once etcd answers", timeout=30)
    finally:
        chain.stop_all()


def test_a_taken_metrics_port_is_one_line_at_start(tmp_path):
    with closing(socket.create_server(("127.0.0.1", 0))) as taken:
        port = taken.getsockname()[1]
        chain = Chain(tmp_path, Path("/nonexistent"))
        process = chain.spawn("aadproxy", [script("clusterconnect-aadproxy"), "--listen", f"127.0.0.1:{free_port()}",
                                           "--kubeconfig", str(tmp_path / "none"), "--metrics-listen",
                                           f"127.0.0.1:{port}"], metrics=False)
        process.popen.wait(30)
    assert process.returncode == 2
    assert process.log.read_text().strip().splitlines()[-1] == \
        f"error: cannot listen on 127.0.0.1:{port} (--metrics-listen): address in use"
