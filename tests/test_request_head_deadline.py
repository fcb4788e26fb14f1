"""Slowloris at the auth proxy: a request head trickling in byte by byte through the whole chain (real
TLS to the client proxy, relay, agent) is answered 408 at the deadline and its connection closed, while
a normal request on another connection is served meanwhile."""

from __future__ import annotations

import select
import socket
import time

import pytest
from chain import Chain
from https_client import Endpoint

DEADLINE = 1.0  # the auth proxy's --request-head-timeout in this chain
PACE = 0.05  # seconds between the slow client's bytes: the whole head would take over 10 s


@pytest.fixture(scope="module")
def slow_head_chain(devcluster, admin_sa_token, cluster_endpoint_kubeconfig, tmp_path_factory):
    chain = Chain(tmp_path_factory.mktemp("head-deadline"), cluster_endpoint_kubeconfig,
                  authproxy_args=["--request-head-timeout", str(DEADLINE)])
    kubeconfig = chain.state_dir / "kubeconfig"
    with chain.running(admin_sa_token, kubeconfig):
        yield chain, kubeconfig


def test_a_head_sent_byte_by_byte_is_cut_at_the_deadline(slow_head_chain):
    chain, kubeconfig = slow_head_chain
    endpoint = Endpoint(kubeconfig)
    head = (f"GET /api/v1/namespaces HTTP/1.1\r\nHost: {endpoint.host}\r\n"
            f"Authorization: {endpoint.headers['Authorization']}\r\nX-Pad: {'p' * 40}\r\n\r\n").encode()
    assert len(head) * PACE > 10 * DEADLINE
    raw = socket.create_connection((endpoint.host, endpoint.port), timeout=10)
    with endpoint.ssl.wrap_socket(raw, server_hostname=endpoint.host) as tls:
        started = time.monotonic()
        sent = 0
        answer = b""
        while sent < len(head) and time.monotonic() - started < 5 * DEADLINE:
            tls.sendall(head[sent:sent + 1])
            sent += 1
            if sent == 5:  # the slow head is on its way: another connection is served meanwhile
                assert endpoint.one_request("/version") == 200
            readable, _, _ = select.select([tls], [], [], PACE)  # the pace of the attacker, or the answer
            if readable:
                answer = tls.recv(65536)
                break
        elapsed = time.monotonic() - started
        while answer and b"\r\n\r\n" not in answer:
            more = tls.recv(65536)
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert sent < len(head), "the whole head went through: no deadline"
    assert DEADLINE <= elapsed < 3 * DEADLINE + 1, elapsed
    log = (chain.state_dir / "logs" / "aadproxy.log").read_text()
    assert '"error": "HeadTimeout"' in log
