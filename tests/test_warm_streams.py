"""Warm streams: a Dial takes an Accept+Serve pair the agent opened ahead of need, and the pool refills.

The client proxy sends its Dial when TCP accepts, before the TLS handshake with the client; a client
whose handshake fails must not leave that Dial (and the agent stream it took) behind.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

from chain import wait_until
from https_client import Endpoint
from service_stats import stats

WARM = 2  # the agent's default --warm-streams


def _get_version(endpoint: Endpoint) -> int:
    conn = endpoint.connect()
    try:
        conn.request("GET", "/version", headers={**endpoint.headers, "Connection": "close"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _relay_when(chain, predicate, what: str, timeout: float = 15) -> dict:
    relay = chain.processes["relay"]
    return wait_until(lambda: (lambda now: now if predicate(now) else None)(stats(relay)), timeout, what, interval=0.2)


def test_a_connection_takes_a_warm_stream_and_the_pool_refills(chain) -> None:
    tunnel, kubeconfig = chain
    before = _relay_when(tunnel, lambda s: s["warm_streams"] == WARM and s["open_connections"] == 0,
                         "a full pool of warm streams")
    assert _get_version(Endpoint(kubeconfig)) == 200
    after = _relay_when(tunnel, lambda s: s["warm_streams"] == WARM and s["open_connections"] == 0,
                        "the pool to refill")
    assert after["dials_warm"] == before["dials_warm"] + 1
    assert after["dials_requested"] == before["dials_requested"]


def test_more_connections_than_warm_streams_fall_back_to_dial_requests(chain) -> None:
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
        during = stats(tunnel.processes["relay"])
        assert during["open_connections"] == 12
        requested = during["dials_requested"] - before["dials_requested"]
        warm = during["dials_warm"] - before["dials_warm"]
        # The pool refills while the burst arrives, so how many found a warm stream varies; some cannot have.
        assert requested >= 1 and requested + warm == 12
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
    assert _get_version(endpoint) == 200
