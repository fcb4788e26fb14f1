"""Warm streams: a Dial takes an Accept+Serve pair the agent opened ahead of need, and the pool refills.

The client proxy sends its Dial when TCP accepts, before the TLS handshake with the client; a client
whose handshake fails must not leave that Dial (and the agent stream it took) behind.
"""

from __future__ import annotations

import socket
import struct
from concurrent.futures import ThreadPoolExecutor

from chain import wait_until
from https_client import Endpoint

WARM = 2  # the agent's default --warm-streams


def _relay_when(chain, predicate, what: str, timeout: float = 15) -> dict:
    relay = chain.processes["relay"]
    return wait_until(lambda: (lambda now: now if predicate(now) else None)(relay.stats()), timeout, what, interval=0.2)


def test_a_connection_takes_a_warm_stream_and_the_pool_refills(chain) -> None:
    tunnel, kubeconfig = chain
    before = _relay_when(tunnel, lambda s: s["warm_streams"] == WARM and s["open_connections"] == 0,
                         "a full pool of warm streams")
    assert Endpoint(kubeconfig).one_request() == 200
    after = _relay_when(tunnel, lambda s: s["warm_streams"] == WARM and s["open_connections"] == 0,
                        "the pool to refill")
    assert after["dials_warm"] == before["dials_warm"] + 1
    assert after["dials_requested"] == before["dials_requested"]


def test_an_agent_without_warm_streams_is_asked_for_each_connection(chain) -> None:
    tunnel, kubeconfig = chain
    tunnel.processes["agent"].stop()
    try:
        tunnel.start_agent(extra_args=("--warm-streams", "0"))
        before = _relay_when(tunnel, lambda s: s["agents"] == 1 and s["open_connections"] == 0,
                             "the agent without warm streams")
        assert before["warm_streams"] == 0
        assert Endpoint(kubeconfig).one_request() == 200
        after = _relay_when(tunnel, lambda s: s["open_connections"] == 0, "the request to end")
        assert after["dials_requested"] == before["dials_requested"] + 1
        assert after["dials_warm"] == before["dials_warm"]
    finally:
        tunnel.processes["agent"].stop()
        tunnel.start_agent()


def test_more_connections_than_warm_streams_are_all_served(chain) -> None:
    tunnel, kubeconfig = chain
    endpoint = Endpoint(kubeconfig)
    before = _relay_when(tunnel, lambda s: s["warm_streams"] == WARM, "a full pool of warm streams")
    # Watches stay open, so all 12 connections hold an agent stream at the same time.
    conns = [endpoint.connect() for _ in range(12)]
    try:
        def watch(conn) -> int:
            conn.request("GET", "/api/v1/namespaces/default/configmaps?watch=1&timeoutSeconds=30",
                         headers=endpoint.headers)
            return conn.getresponse().status

        with ThreadPoolExecutor(12) as pool:
            assert list(pool.map(watch, conns)) == [200] * 12
        during = tunnel.processes["relay"].stats()
        assert during["open_connections"] == 12
        requested = during["dials_requested"] - before["dials_requested"]
        warm = during["dials_warm"] - before["dials_warm"]
        # The pool refills while the burst arrives, so how many found a warm stream varies.
        assert requested + warm == 12
    finally:
        for conn in conns:
            conn.close()
    _relay_when(tunnel, lambda s: s["open_connections"] == 0 and s["warm_streams"] == WARM,
                "the watches to end and the pool to refill")


def test_a_failed_tls_handshake_leaves_no_dial_behind(chain) -> None:
    tunnel, kubeconfig = chain
    endpoint = Endpoint(kubeconfig)
    _relay_when(tunnel, lambda s: s["open_connections"] == 0 and s["warm_streams"] == WARM, "an idle relay")
    for _ in range(5):
        with socket.create_connection((endpoint.host, endpoint.port), timeout=10) as raw:
            raw.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP to a TLS port
            assert raw.recv(100) == b""  # the proxy hangs up
    # Well within the 10 s handshake timeout: the dropped connections' Dials are gone at once.
    _relay_when(tunnel, lambda s: s["open_connections"] == 0 and s["warm_streams"] == WARM,
                "the early Dials of the failed handshakes to end", timeout=4)
    assert endpoint.one_request() == 200


def test_clients_resetting_at_once_leave_the_pool_whole(chain) -> None:
    """Dials cancelled at every stage (while taking a warm stream, while waiting for the agent)
    must give back or end the agent streams they took, or the pool would shrink for good."""
    tunnel, kubeconfig = chain
    endpoint = Endpoint(kubeconfig)
    def agent_idle() -> bool:
        return tunnel.processes["agent"].stats().get("open_connections", 0) == 0

    # Watches of an earlier test may still be in the auth proxy's EOF grace (10 s).
    wait_until(agent_idle, 15, "an idle agent", interval=0.2)
    for _ in range(40):
        raw = socket.create_connection((endpoint.host, endpoint.port), timeout=10)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()  # RST right after the TCP handshake
    _relay_when(tunnel, lambda s: s["open_connections"] == 0 and s["warm_streams"] == WARM,
                "every early Dial to end and the pool to refill", timeout=4)
    # Every agent stream the relay ended is ended at the agent too (and its auth proxy stream).
    wait_until(agent_idle, 4, "the agent's connections of the reset clients to end", interval=0.2)
    assert endpoint.one_request() == 200
    _relay_when(tunnel, lambda s: s["open_connections"] == 0 and s["warm_streams"] == WARM,
                "the request to end and the pool to refill")


def test_clients_resetting_mid_download_leave_nothing_at_the_agent(chain) -> None:
    """The relay reads the agent's stream from the Dial's task; a client that resets while a large
    response is on its way cancels that read half-way. The agent must still learn the end."""
    tunnel, kubeconfig = chain
    endpoint = Endpoint(kubeconfig)
    selector = endpoint.create_configmaps("reset-test", 16, 256 * 1024)

    def agent_idle() -> bool:
        return tunnel.processes["agent"].stats().get("open_connections", 0) == 0

    wait_until(agent_idle, 15, "an idle agent", interval=0.2)
    request = (f"GET /api/v1/namespaces/default/configmaps?labelSelector={selector} HTTP/1.1\r\n"
               f"Host: {endpoint.host}\r\nAuthorization: {endpoint.headers['Authorization']}\r\n\r\n").encode()
    for _ in range(10):
        raw = socket.create_connection((endpoint.host, endpoint.port), timeout=10)
        tls = endpoint.ssl.wrap_socket(raw, server_hostname=endpoint.host)
        tls.sendall(request)
        assert tls.recv(65536)  # the response (4 MiB) is on its way
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tls.close()  # reset with most of it still in flight
    wait_until(agent_idle, 5, "the agent's connections of the reset downloads to end", interval=0.2)
    _relay_when(tunnel, lambda s: s["open_connections"] == 0 and s["warm_streams"] == WARM, "an idle relay")
