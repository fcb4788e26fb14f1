"""The relay's log stays JSON lines when clients drop their connections early (issue #17 item 1).

A client that goes away ends its Dial at the relay; the agent's Accept stream of that connection is
then ended too. That Accept call must not be aborted in a way grpc cannot carry out: it used to be,
and grpc logged a Python traceback (ExecuteBatchError, GRPC_CALL_ERROR_TOO_MANY_OPERATIONS) of a
dozen plain-text lines for each such connection.
"""

from __future__ import annotations

import json
import socket
import struct

from chain import wait_until
from https_client import Endpoint

WARM = 2  # the agent's default --warm-streams


def _idle(tunnel) -> dict | bool:
    relay = tunnel.processes["relay"].stats()
    agent = tunnel.processes["agent"].stats()
    settled = relay["open_connections"] == 0 and relay["warm_streams"] == WARM and agent["open_connections"] == 0
    return relay if settled else False


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _not_json(log_text: str) -> list[str]:
    bad = []
    for line in log_text.splitlines():
        try:
            if not isinstance(json.loads(line), dict):
                bad.append(line)
        except ValueError:
            bad.append(line)
    return bad


def test_clients_dropping_early_leave_only_json_lines_in_the_relay_log(chain) -> None:
    tunnel, kubeconfig = chain
    endpoint = Endpoint(kubeconfig)
    relay_log = tunnel.processes["relay"].log
    wait_until(lambda: _idle(tunnel), 15, "an idle chain", interval=0.2)
    # Most of these Dials find no warm stream and ask the agent for one: cancelled at every stage.
    for _ in range(40):
        _reset(socket.create_connection((endpoint.host, endpoint.port), timeout=10))
    # Clients that send a request and reset before its response arrived, or while it streams in.
    selector = endpoint.create_configmaps("relay-logs-test", 4, 256 * 1024)
    request = (f"GET /api/v1/namespaces/default/configmaps?labelSelector={selector} HTTP/1.1\r\n"
               f"Host: {endpoint.host}\r\nAuthorization: {endpoint.headers['Authorization']}\r\n\r\n").encode()
    for attempt in range(20):
        tls = endpoint.ssl.wrap_socket(socket.create_connection((endpoint.host, endpoint.port), timeout=10),
                                       server_hostname=endpoint.host)
        tls.sendall(request)
        if attempt % 2:
            assert tls.recv(65536)  # the response (1 MiB) is on its way
        _reset(tls)
    # Clients that reset in the middle of a large upload: the relay is writing to the agent's stream.
    upload = (f"POST /api/v1/namespaces/default/configmaps HTTP/1.1\r\nHost: {endpoint.host}\r\n"
              f"Authorization: {endpoint.headers['Authorization']}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {8 * 1024 * 1024}\r\n\r\n").encode() + b"x" * (1024 * 1024)
    for _ in range(20):
        tls = endpoint.ssl.wrap_socket(socket.create_connection((endpoint.host, endpoint.port), timeout=10),
                                       server_hostname=endpoint.host)
        tls.sendall(upload)
        _reset(tls)
    wait_until(lambda: _idle(tunnel), 15, "every dropped connection to end at the relay and the agent",
               interval=0.2)
    # Canary: a connection served after all of them, and the relay's stats line logged after that one.
    assert endpoint.one_request() == 200
    wait_until(lambda: _idle(tunnel), 15, "the last connection to end", interval=0.2)
    text = relay_log.read_text(errors="replace")
    bad = _not_json(text)
    assert not bad, f"{len(bad)} non-JSON lines in the relay log, first ones:\n" + "\n".join(bad[:15])
    assert "Traceback" not in text and "ExecuteBatchError" not in text
