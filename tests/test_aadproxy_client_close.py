"""A client that closes a watch after its 200 ends the connection normally, and the auth proxy logs it so.

With the real chain (client proxy, relay, agent, auth proxy as console scripts) on the devcluster,
and with the auth proxy's process alone. Each log is read up to a stats line written after the
connections ended (their gauge back at 0): everything they logged is before that line, so "no
failure was logged" is proven, not waited for.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import uuid
from pathlib import Path

import grpc
import h11
from chain import Process, free_port, port_open, script, wait_until
from https_client import Endpoint
from test_aadproxy_http import bound_serve, make_pki, read_request, write_kubeconfig

from clusterconnect.streams import GrpcClientStream
from clusterconnect.v1 import tunnel_pb2_grpc


def _lines_since(log: Path, offset: int) -> list[str]:
    with open(log, "rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace").splitlines()


def test_client_closing_a_watch_is_a_normal_end(chain) -> None:
    tunnel, kubeconfig = chain
    endpoint = Endpoint(kubeconfig)
    authproxy = tunnel.processes["aadproxy"]
    name = f"close-{uuid.uuid4().hex[:8]}"
    conn = endpoint.connect()
    try:
        conn.request("POST", "/api/v1/namespaces/default/configmaps",
                     body=json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}),
                     headers={**endpoint.headers, "Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        assert response.status == 201
    finally:
        conn.close()

    offset = authproxy.log.stat().st_size
    watch = endpoint.connect()
    try:
        watch.request("GET", f"/api/v1/namespaces/default/configmaps?watch=1&fieldSelector=metadata.name%3D{name}",
                      headers=endpoint.headers)
        response = watch.getresponse()
        assert response.status == 200
        event = json.loads(response.readline())
        assert event["type"] == "ADDED" and event["object"]["metadata"]["name"] == name
    finally:
        watch.close()  # the client hangs up while the watch goes on
    # Events after the hang-up: written toward a client that is gone, so the client proxy's write
    # fails and the chain cancels the streams (with no events, the auth proxy sees EOF instead).
    conn = endpoint.connect()
    try:
        for value in range(3):
            conn.request("PATCH", f"/api/v1/namespaces/default/configmaps/{name}",
                         body=json.dumps({"data": {"k": str(value)}}),
                         headers={**endpoint.headers, "Content-Type": "application/merge-patch+json"})
            response = conn.getresponse()
            response.read()
            assert response.status == 200
    finally:
        conn.close()

    # The canary: a stats line with no connection open comes after every line of the watch's connection.
    wait_until(lambda: authproxy.stats().get("open_connections") == 0, 30, "the watch's connection to end",
               interval=0.2)
    lines = _lines_since(authproxy.log, offset)
    events = [json.loads(line) for line in lines]  # every line is JSON (no traceback, no library text)
    watches = [e for e in events if e.get("event") == "request" and e.get("method") == "GET"
               and e.get("path") == "/api/v1/namespaces/default/configmaps" and e.get("status") == 200]
    assert len(watches) == 1, lines
    trace = watches[0]["trace_id"]
    assert trace
    mine = [e for e in events if e.get("trace_id") == trace]
    assert not [e for e in mine if e.get("level") in ("warning", "error") or "exception" in e], mine
    ends = [e for e in mine if e.get("event") == "connection closed"]
    assert len(ends) == 1 and ends[0]["reason"] == "client closed", mine
    assert mine[-1] is ends[0], mine  # the end is the connection's last word


# ---- the same at the auth proxy alone: its process, a local apiserver, the agent's side by hand ----


def _idle(stats: dict) -> dict | None:
    return stats if stats.get("open_connections") == 0 else None


class EndlessWatches:
    """An apiserver whose watches never end: events as fast as the proxy takes them."""

    def __init__(self) -> None:
        self.active = 0
        self.idle = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.active += 1
        self.idle.clear()
        conn = h11.Connection(h11.SERVER)
        try:
            if await read_request(reader, conn) is None:
                return
            writer.write(conn.send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")])))
            # Bounded (64 MiB a watch: far more than is written before the client hangs up), and a
            # yield each time round: drain() does not yield while the transport is not paused, and
            # asyncio's TLS transport may keep taking writes, which starved the test's own client on
            # this loop and grew the buffer without end (seen once in a fresh clone's run).
            event = b'{"type":"MODIFIED","object":{}}\n' * 32
            for _ in range(64 * 1024 * 1024 // len(event)):
                writer.write(conn.send(h11.Data(data=event)))
                await writer.drain()
                await asyncio.sleep(0)
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            self.active -= 1
            if not self.active:
                self.idle.set()


def test_cancelled_streams_mid_response_are_normal_ends(tmp_path: Path) -> None:
    """The agent cancels a Serve stream when the client's connection ended; the auth proxy may be
    writing then (a busy watch: its write waits for flow control). grpc.aio raises ExecuteBatchError
    there, which used to be logged as "connection failed"."""
    connections = 20
    ca_path, cert_path, key_path = make_pki(tmp_path, ["127.0.0.1"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    api_port, port = free_port(), free_port()
    kubeconfig = write_kubeconfig(tmp_path, api_port, ca_path)
    log = tmp_path / "aadproxy.log"
    with open(log, "wb") as handle:
        authproxy = Process("aadproxy", subprocess.Popen(
            [script("clusterconnect-aadproxy"), "--listen", f"127.0.0.1:{port}", "--kubeconfig", str(kubeconfig)],
            stdout=handle, stderr=handle, stdin=subprocess.DEVNULL), log)
    request = b"GET /api/v1/pods?watch=1 HTTP/1.1\r\nhost: k\r\nauthorization: Bearer t\r\n\r\n"

    async def main() -> None:
        watches = EndlessWatches()
        api = await asyncio.start_server(watches.serve, "127.0.0.1", api_port, ssl=context)
        await asyncio.to_thread(wait_until, lambda: port_open(port), 30, "the auth proxy to listen", authproxy)
        before = await asyncio.to_thread(authproxy.stats)
        async with api, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = tunnel_pb2_grpc.AuthProxyStub(channel)
            for _ in range(connections):
                call = await bound_serve(stub)
                stream = GrpcClientStream(call)
                await stream.send(request)
                received = b""
                async with asyncio.timeout(10):
                    while b"MODIFIED" not in received:
                        data = await stream.receive()
                        assert data, f"the response ended before its first event: {received[:300]!r}"
                        received += data
                assert received.startswith(b"HTTP/1.1 200 ")
                call.cancel()  # the agent's side of a client that hung up
            # The canary: a stats line with no connection open comes after all their lines.
            after = await asyncio.to_thread(wait_until, lambda: _idle(authproxy.stats()), 30,
                                            "every connection to end", authproxy, 0.2)
            # No task outlives its connection (timers and keepalive pings come and go: a little slack).
            assert after["tasks"] <= before["tasks"] + 3, (before, after)
            await asyncio.to_thread(authproxy.stop)  # its pooled connections end too: no handler is cut off
            await asyncio.wait_for(watches.idle.wait(), 10)

    try:
        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        authproxy.stop()
    events = [json.loads(line) for line in log.read_text().splitlines()]  # every line is JSON
    assert not [e for e in events if e.get("level") in ("warning", "error")], events
    ends = [e for e in events if e["event"] == "connection closed"]
    assert [e["reason"] for e in ends] == ["client closed"] * connections, ends
