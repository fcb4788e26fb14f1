"""The auth proxy's HTTP handling: header filtering, authentication, and the forwarder's framing.

The downstream side is an in-memory ByteStream; the upstream is a real local TCP (or TLS) server.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import h11
import pytest

from clusterconnect.aadproxy import headers as hdr
from clusterconnect.aadproxy import http_forwarder
from clusterconnect.aadproxy import upstream as upstream_mod
from clusterconnect.aadproxy.apiserver import TokenSource, from_kubeconfig
from clusterconnect.aadproxy.authn import Forward, Reject, TokenPassthrough
from clusterconnect.aadproxy.http_forwarder import forward_connection
from clusterconnect.aadproxy.kubeapi import fetch_version
from clusterconnect.socket_stream import SocketStream, open_socket_stream
from clusterconnect.v1 import tunnel_pb2

TIMEOUT = 5.0
AUTH = (b"authorization", b"Bearer tok-123")
# What the agent sends first on every Serve stream: the connection's caller (here: not verified by a relay).
UNVERIFIED_BINDING = tunnel_pb2.Chunk(bound=tunnel_pb2.Bound(caller=tunnel_pb2.Caller()))


async def bound_serve(stub):  # an AuthProxyStub
    """A Serve call that starts as the agent starts one: with the connection's binding."""
    call = stub.Serve()
    await call.write(UNVERIFIED_BINDING)
    return call


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


# ---- pure logic ---------------------------------------------------------------------------------


def test_strip_hop_by_hop_fixed_list_and_connection_named() -> None:
    headers = [
        (b"host", b"x"),
        (b"connection", b"keep-alive, X-Custom"),
        (b"keep-alive", b"timeout=5"),
        (b"x-custom", b"1"),
        (b"proxy-connection", b"keep-alive"),
        (b"proxy-authorization", b"Basic abc"),
        (b"proxy-authenticate", b"Basic"),
        (b"te", b"trailers"),
        (b"trailer", b"x-foo"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"websocket"),
        (b"accept", b"application/json"),
    ]
    assert hdr.strip_hop_by_hop(headers) == [(b"host", b"x"), (b"accept", b"application/json")]


def test_connection_can_name_authorization_and_impersonation_but_only_removes_them() -> None:
    headers = [
        (b"connection", b"Authorization"),
        (b"Connection", b"impersonate-user ,  IMPERSONATE-GROUP"),
        AUTH,
        (b"impersonate-user", b"alice"),
        (b"impersonate-group", b"system:masters"),
        (b"impersonate-uid", b"1"),
        (b"accept", b"*/*"),
    ]
    assert hdr.strip_hop_by_hop(headers) == [(b"impersonate-uid", b"1"), (b"accept", b"*/*")]


def test_upgrade_protocol_needs_connection_upgrade_and_one_upgrade_header() -> None:
    assert hdr.upgrade_protocol([(b"connection", b"Upgrade"), (b"upgrade", b"SPDY/3.1")]) == b"SPDY/3.1"
    assert hdr.upgrade_protocol([(b"connection", b"keep-alive, upgrade"), (b"upgrade", b"websocket")]) == b"websocket"
    assert hdr.upgrade_protocol([(b"upgrade", b"websocket")]) is None
    assert hdr.upgrade_protocol([(b"connection", b"upgrade")]) is None
    assert hdr.upgrade_protocol([(b"connection", b"upgrade"), (b"upgrade", b"a"), (b"upgrade", b"b")]) is None


def test_conflicting_framing() -> None:
    assert hdr.has_conflicting_framing([(b"content-length", b"3"), (b"transfer-encoding", b"chunked")])
    assert not hdr.has_conflicting_framing([(b"content-length", b"3")])


def authenticate(headers: list[tuple[bytes, bytes]]) -> Forward | Reject:
    return asyncio.run(TokenPassthrough().authenticate(headers))


def test_passthrough_forwards_token_and_impersonation_unchanged() -> None:
    headers = [(b"host", b"h"), AUTH, (b"impersonate-user", b"bob")]
    assert authenticate(headers) == Forward(headers=headers)


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"authorization", b"Bearer")],
        [(b"authorization", b"Bearer   ")],
        [(b"authorization", b"Basic dXNlcjpwYXNz")],
        [(b"authorization", b"tok-123")],
        [AUTH, AUTH],
        [AUTH, (b"authorization", b"Bearer other")],
    ],
)
def test_passthrough_rejects(headers: list[tuple[bytes, bytes]]) -> None:
    decision = authenticate([(b"host", b"h"), *headers])
    assert isinstance(decision, Reject) and decision.status == 401
    assert decision.message.startswith("Unauthorized")


def test_token_source_rereads_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("one\n")
    source = TokenSource(path=path)
    assert source.get() == "one"
    path.write_text("second")
    assert source.get() == "second"
    assert TokenSource(path=tmp_path / "missing").get() is None


# ---- test doubles -------------------------------------------------------------------------------


class MemoryStream:
    """The downstream side, driven by the test as kubectl would over the tunnel."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.out = bytearray()
        self.changed = asyncio.Event()
        self.eof_sent = False
        self.closed = False

    # ByteStream, as used by the forwarder
    async def receive(self) -> bytes:
        return await self.inbox.get()

    async def send(self, data: bytes) -> None:
        self.out += data
        self.changed.set()

    async def send_eof(self) -> None:
        self.eof_sent = True
        self.changed.set()

    async def close(self) -> None:
        self.closed = True
        self.changed.set()

    # test side
    def write(self, data: bytes) -> None:
        self.inbox.put_nowait(data)

    def write_eof(self) -> None:
        self.inbox.put_nowait(b"")

    async def take(self) -> bytes:
        """Wait for bytes from the proxy and return all of them; b"" once it ended the stream."""
        while not self.out:
            if self.eof_sent or self.closed:
                return b""
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), TIMEOUT)
        data = bytes(self.out)
        self.out.clear()
        return data

    async def take_exactly(self, size: int) -> bytes:
        buf = bytearray()
        while len(buf) < size:
            data = await self.take()
            assert data, f"stream ended after {bytes(buf)!r}"
            buf += data
        assert len(buf) == size, bytes(buf)
        return bytes(buf)


class Client:
    """An h11 client on the MemoryStream: what kubectl does."""

    def __init__(self, stream: MemoryStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    def request(self, method: bytes, target: bytes, headers: list, body: bytes | None = None) -> None:
        headers = [(b"host", b"kubernetes"), *headers]
        if body is not None:
            headers.append((b"content-length", str(len(body)).encode()))
        data = self.conn.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            data += self.conn.send(h11.Data(data=body))
        data += self.conn.send(h11.EndOfMessage())
        self.stream.write(data)

    async def event(self):
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.take())

    async def response(self) -> tuple[h11.Response, bytes]:
        head = await self.event()
        assert isinstance(head, (h11.Response, h11.InformationalResponse)), head
        body = bytearray()
        while True:
            event = await self.event()
            if isinstance(event, h11.EndOfMessage):
                return head, bytes(body)
            assert isinstance(event, h11.Data), event
            body += event.data

    def next_cycle(self) -> None:
        self.conn.start_next_cycle()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Upstream:
    """A local TCP server standing in for the apiserver; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Upstream:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            finally:
                writer.close()
                self.closed.set()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def connect(self) -> SocketStream:
        return await open_socket_stream("127.0.0.1", self.port)


async def read_request(reader: asyncio.StreamReader, conn: h11.Connection) -> tuple[h11.Request, bytes] | None:
    """Read one full request with an h11 server on the upstream side."""
    request = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        else:
            return None


def respond(conn: h11.Connection, status: int, body: bytes, headers: list | None = None) -> bytes:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    return (
        conn.send(h11.Response(status_code=status, headers=headers))
        + conn.send(h11.Data(data=body))
        + conn.send(h11.EndOfMessage())
    )


async def echo_apiserver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list) -> None:
    """Answers every request with its method, target, headers and body length, keep-alive."""
    conn = h11.Connection(h11.SERVER)
    while True:
        got = await read_request(reader, conn)
        if got is None:
            return
        request, body = got
        seen.append((request, body))
        answer = {
            "method": request.method.decode(),
            "target": request.target.decode(),
            "headers": [[k.decode(), v.decode()] for k, v in request.headers],
            "body": len(body),
        }
        writer.write(respond(conn, 200, json.dumps(answer).encode()))
        await writer.drain()
        conn.start_next_cycle()


async def no_upstream() -> SocketStream:
    raise AssertionError("upstream must not be contacted")


def status_of(body: bytes) -> dict:
    status = json.loads(body)
    assert status["kind"] == "Status" and status["apiVersion"] == "v1" and status["status"] == "Failure"
    return status


async def finished(task: asyncio.Task) -> None:
    await asyncio.wait_for(task, TIMEOUT)


def no_leaks() -> None:
    assert http_forwarder.open_connections() == 0
    assert upstream_mod.open_upstream_connections() == 0


# ---- forwarder ----------------------------------------------------------------------------------


def test_missing_token_is_401_and_nothing_is_forwarded() -> None:
    async def main() -> None:
        down = MemoryStream()
        task = asyncio.create_task(forward_connection(down, no_upstream, TokenPassthrough()))
        client = Client(down)
        client.request(b"GET", b"/api/v1/namespaces", [(b"connection", b"Authorization"), AUTH])
        head, body = await client.response()
        assert head.status_code == 401
        assert (b"content-type", b"application/json") in head.headers
        status = status_of(body)
        assert status["code"] == 401 and status["reason"] == "Unauthorized"
        assert status["message"].startswith("Unauthorized: ")
        await finished(task)
        assert down.closed
        no_leaks()

    run(main())


def test_keep_alive_two_requests_one_upstream_connection_token_unchanged() -> None:
    async def main() -> None:
        seen: list = []
        async with Upstream(lambda r, w: echo_apiserver(r, w, seen)) as upstream:
            down = MemoryStream()
            task = asyncio.create_task(forward_connection(down, upstream.connect, TokenPassthrough()))
            client = Client(down)
            client.request(
                b"GET",
                b"/version?timeout=32s",
                [AUTH, (b"connection", b"keep-alive, x-drop"), (b"x-drop", b"1"), (b"te", b"trailers"),
                 (b"impersonate-user", b"alice")],
            )
            head, body = await client.response()
            assert head.status_code == 200
            first = json.loads(body)
            assert first["target"] == "/version?timeout=32s"
            names = [k for k, _ in first["headers"]]
            assert ["authorization", "Bearer tok-123"] in first["headers"]
            assert ["impersonate-user", "alice"] in first["headers"]
            assert not {"connection", "x-drop", "te"} & set(names)

            client.next_cycle()
            client.request(b"POST", b"/api/v1/namespaces", [AUTH, (b"content-type", b"application/json")], b"{}")
            head, body = await client.response()
            assert head.status_code == 200 and json.loads(body)["body"] == 2
            assert upstream.connections == 1

            down.write_eof()
            await finished(task)
            assert len(seen) == 2
            await asyncio.wait_for(upstream.closed.wait(), TIMEOUT)
        no_leaks()

    run(main())


def test_second_request_without_token_is_refused_on_a_used_connection() -> None:
    async def main() -> None:
        seen: list = []
        async with Upstream(lambda r, w: echo_apiserver(r, w, seen)) as upstream:
            down = MemoryStream()
            task = asyncio.create_task(forward_connection(down, upstream.connect, TokenPassthrough()))
            client = Client(down)
            client.request(b"GET", b"/version", [AUTH])
            assert (await client.response())[0].status_code == 200
            client.next_cycle()
            client.request(b"GET", b"/api", [])
            assert (await client.response())[0].status_code == 401
            await finished(task)
            assert len(seen) == 1
            await asyncio.wait_for(upstream.closed.wait(), TIMEOUT)
        no_leaks()

    run(main())


def test_chunked_response_flushes_each_chunk_immediately() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = h11.Connection(h11.SERVER)
            await read_request(reader, conn)
            writer.write(conn.send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")])))
            writer.write(conn.send(h11.Data(data=b'{"type":"ADDED"}\n')))
            await writer.drain()
            await asyncio.wait_for(release.wait(), TIMEOUT)  # the next event only after the first arrived
            writer.write(conn.send(h11.Data(data=b'{"type":"MODIFIED"}\n')) + conn.send(h11.EndOfMessage()))
            await writer.drain()
            await read_request(reader, conn)  # until the proxy closes

        async with Upstream(watch) as upstream:
            down = MemoryStream()
            task = asyncio.create_task(forward_connection(down, upstream.connect, TokenPassthrough()))
            client = Client(down)
            client.request(b"GET", b"/api/v1/pods?watch=true", [AUTH])
            head = await client.event()
            assert head.status_code == 200
            assert (b"transfer-encoding", b"chunked") in head.headers
            first = await client.event()
            assert isinstance(first, h11.Data) and first.data == b'{"type":"ADDED"}\n'
            release.set()
            second = await client.event()
            assert isinstance(second, h11.Data) and second.data == b'{"type":"MODIFIED"}\n'
            assert isinstance(await client.event(), h11.EndOfMessage)
            down.write_eof()
            await finished(task)
        no_leaks()

    run(main())


def test_request_body_streams_before_it_is_complete() -> None:
    async def main() -> None:
        got_first_part = asyncio.Event()

        async def apply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = h11.Connection(h11.SERVER)
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) >= 5:
                        got_first_part.set()
                elif isinstance(event, h11.EndOfMessage):
                    break
            writer.write(respond(conn, 201, bytes(body)))
            await writer.drain()
            await reader.read()

        async with Upstream(apply) as upstream:
            down = MemoryStream()
            task = asyncio.create_task(forward_connection(down, upstream.connect, TokenPassthrough()))
            client = Client(down)
            conn = client.conn
            down.write(conn.send(h11.Request(method=b"PUT", target=b"/x", headers=[
                (b"host", b"k"), AUTH, (b"transfer-encoding", b"chunked")])) + conn.send(h11.Data(data=b"part1")))
            await asyncio.wait_for(got_first_part.wait(), TIMEOUT)
            down.write(conn.send(h11.Data(data=b"part2")) + conn.send(h11.EndOfMessage()))
            head, body = await client.response()
            assert head.status_code == 201 and body == b"part1part2"
            down.write_eof()
            await finished(task)
        no_leaks()

    run(main())


def test_upgrade_101_then_raw_bytes_both_ways_including_buffered_bytes() -> None:
    async def main() -> None:
        seen: list = []

        async def exec_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = h11.Connection(h11.SERVER)
            request, _ = await read_request(reader, conn)
            seen.append(request)
            switching = h11.InformationalResponse(
                status_code=101, headers=[(b"connection", b"Upgrade"), (b"upgrade", b"SPDY/3.1"),
                                          (b"x-stream-protocol-version", b"v4.channel.k8s.io")])
            writer.write(conn.send(switching) + b"hello-from-server")
            await writer.drain()
            early, _ = conn.trailing_data
            data = early or await reader.read(65536)
            while data:
                writer.write(b"echo:" + data)
                await writer.drain()
                data = await reader.read(65536)

        async with Upstream(exec_server) as upstream:
            down = MemoryStream()
            task = asyncio.create_task(forward_connection(down, upstream.connect, TokenPassthrough()))
            conn = h11.Connection(h11.CLIENT)
            down.write(conn.send(h11.Request(method=b"POST", target=b"/api/v1/namespaces/d/pods/p/exec?command=sh",
                                             headers=[(b"host", b"k"), AUTH, (b"connection", b"Upgrade"),
                                                      (b"upgrade", b"SPDY/3.1"),
                                                      (b"x-stream-protocol-version", b"v4.channel.k8s.io")]))
                       + conn.send(h11.EndOfMessage()) + b"early-raw")
            response = None
            while response is None:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await down.take())
                else:
                    response = event
            assert isinstance(response, h11.InformationalResponse) and response.status_code == 101
            assert (b"upgrade", b"SPDY/3.1") in response.headers
            assert (b"x-stream-protocol-version", b"v4.channel.k8s.io") in response.headers
            assert conn.our_state is h11.SWITCHED_PROTOCOL
            rest = bytearray(conn.trailing_data[0])
            while len(rest) < len(b"hello-from-serverecho:early-raw"):
                rest += await down.take()
            assert bytes(rest) == b"hello-from-serverecho:early-raw"
            down.write(b"\x00\x01binary")
            assert await down.take_exactly(len(b"echo:\x00\x01binary")) == b"echo:\x00\x01binary"

            request = seen[0]
            assert (b"upgrade", b"SPDY/3.1") in request.headers
            assert (b"connection", b"Upgrade") in request.headers
            down.write_eof()  # kubectl closes: the upstream ends, then so does the forwarder
            await finished(task)
            assert down.eof_sent and down.closed
        no_leaks()

    run(main())


def test_upgrade_answered_without_101_closes_both_connections() -> None:
    async def main() -> None:
        async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = h11.Connection(h11.SERVER)
            await read_request(reader, conn)
            writer.write(respond(conn, 403, b'{"kind":"Status","code":403}'))
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # the proxy closed it

        async with Upstream(refuse) as upstream:
            down = MemoryStream()
            task = asyncio.create_task(forward_connection(down, upstream.connect, TokenPassthrough()))
            client = Client(down)
            client.request(b"GET", b"/api/v1/namespaces/d/pods/p/exec", [
                AUTH, (b"connection", b"Upgrade"), (b"upgrade", b"websocket"), (b"sec-websocket-version", b"13")])
            head, body = await client.response()
            assert head.status_code == 403 and b"Status" in body
            # Whatever kubectl might send next goes nowhere.
            down.write(b"GET /api/v1/secrets HTTP/1.1\r\nhost: k\r\n\r\n")
            await finished(task)
            assert down.closed
            await asyncio.wait_for(upstream.closed.wait(), TIMEOUT)
            assert upstream.connections == 1
        no_leaks()

    run(main())


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"POST /api HTTP/1.1\r\nhost: k\r\nauthorization: Bearer t\r\ncontent-length: 5\r\n"
         b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST /api HTTP/1.1\r\nhost: k\r\nauthorization: Bearer t\r\ncontent-length: 5\r\n"
         b"content-length: 6\r\n\r\nhello", 400),
        (b"GET /api HTTP/1.1\r\nhost: k\r\nauthorization: Bearer t\r\nx-folded: a\r\n  b\r\n\r\n", 400),
        (b"GET /api HTTP/1.1\r\nhost: k\r\nauthorization: Bearer t\r\ntransfer-encoding: gzip\r\n\r\n", 501),
        (b"GET http://evil/api HTTP/1.1\r\nhost: k\r\nauthorization: Bearer t\r\n\r\n", 400),
        (b"GET /api HTTP/1.1\r\nhost: k\r\nauthorization: Bearer t\r\nx-big: " + b"a" * 70000 + b"\r\n\r\n", 431),
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        # Connection naming a framing header: dropping it as hop-by-hop would forward another request.
        (b"POST /api HTTP/1.1\r\nhost: k\r\nauthorization: Bearer t\r\nconnection: Content-Length\r\n"
         b"content-length: 5\r\n\r\nhello", 400),
        (b"POST /api HTTP/1.1\r\nhost: k\r\nauthorization: Bearer t\r\nconnection: keep-alive, Transfer-Encoding\r\n"
         b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400),
        (b"GET /api HTTP/1.1\r\nhost: k\r\nauthorization: Bearer t\r\nconnection: host\r\n\r\n", 400),
    ],
)
def test_malformed_requests_are_refused_and_never_forwarded(raw: bytes, status: int) -> None:
    async def main() -> None:
        down = MemoryStream()
        task = asyncio.create_task(forward_connection(down, no_upstream, TokenPassthrough()))
        down.write(raw)
        client = Client(down)
        head, body = await client.response()
        assert head.status_code == status
        assert status_of(body)["code"] == status
        await finished(task)
        assert down.closed
        no_leaks()

    run(main())


def test_upstream_unreachable_is_502() -> None:
    async def main() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()  # nothing listens there now

        async def connect() -> SocketStream:
            return await open_socket_stream("127.0.0.1", port)

        down = MemoryStream()
        task = asyncio.create_task(forward_connection(down, connect, TokenPassthrough()))
        client = Client(down)
        client.request(b"GET", b"/version", [AUTH])
        head, body = await client.response()
        assert head.status_code == 502
        status = status_of(body)
        assert status["code"] == 502 and "\n" not in status["message"]
        await finished(task)
        no_leaks()

    run(main())


def test_upstream_closing_mid_response_closes_downstream() -> None:
    async def main() -> None:
        async def partial(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = h11.Connection(h11.SERVER)
            await read_request(reader, conn)
            writer.write(conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"100")]))
                         + conn.send(h11.Data(data=b"only-part")))
            await writer.drain()

        async with Upstream(partial) as upstream:
            down = MemoryStream()
            task = asyncio.create_task(forward_connection(down, upstream.connect, TokenPassthrough()))
            client = Client(down)
            client.request(b"GET", b"/api/v1/pods", [AUTH])
            head = await client.event()
            assert head.status_code == 200
            data = await client.event()
            assert data.data == b"only-part"
            await finished(task)
            assert down.closed
            with pytest.raises(h11.RemoteProtocolError):
                await client.event()  # incomplete body, then EOF
        no_leaks()

    run(main())


def test_upstream_closing_before_answer_is_502() -> None:
    async def main() -> None:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader, h11.Connection(h11.SERVER))

        async with Upstream(hang_up) as upstream:
            down = MemoryStream()
            task = asyncio.create_task(forward_connection(down, upstream.connect, TokenPassthrough()))
            client = Client(down)
            client.request(b"GET", b"/api", [AUTH])
            head, body = await client.response()
            assert head.status_code == 502 and status_of(body)["code"] == 502
            await finished(task)
        no_leaks()

    run(main())


def test_downstream_half_close_still_gets_the_response() -> None:
    async def main() -> None:
        async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = h11.Connection(h11.SERVER)
            await read_request(reader, conn)
            await asyncio.sleep(0.1)
            writer.write(respond(conn, 200, b"late"))
            await writer.drain()
            await reader.read()

        async with Upstream(slow) as upstream:
            down = MemoryStream()
            task = asyncio.create_task(forward_connection(down, upstream.connect, TokenPassthrough()))
            client = Client(down)
            client.request(b"GET", b"/api", [AUTH])
            down.write_eof()
            head, body = await client.response()
            assert head.status_code == 200 and body == b"late"
            await finished(task)
            assert down.closed
        no_leaks()

    run(main())


def test_client_eof_during_endless_response_closes_after_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_forwarder, "EOF_GRACE", 0.2)

    async def main() -> None:
        async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = h11.Connection(h11.SERVER)
            await read_request(reader, conn)
            writer.write(conn.send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")]))
                         + conn.send(h11.Data(data=b"event\n")))
            await writer.drain()
            assert await reader.read() == b""

        async with Upstream(endless) as upstream:
            down = MemoryStream()
            task = asyncio.create_task(forward_connection(down, upstream.connect, TokenPassthrough()))
            client = Client(down)
            client.request(b"GET", b"/api/v1/pods?watch=1", [AUTH])
            assert (await client.event()).status_code == 200
            down.write_eof()  # kubectl went away (Ctrl-C)
            await finished(task)
            await asyncio.wait_for(upstream.closed.wait(), TIMEOUT)
        no_leaks()

    run(main())


def test_idle_upstream_close_reconnects_for_next_request() -> None:
    async def main() -> None:
        async def one_shot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = h11.Connection(h11.SERVER)
            await read_request(reader, conn)
            writer.write(respond(conn, 200, b"ok"))
            await writer.drain()  # then close while idle (handler returns)

        async with Upstream(one_shot) as upstream:
            down = MemoryStream()
            task = asyncio.create_task(forward_connection(down, upstream.connect, TokenPassthrough()))
            client = Client(down)
            client.request(b"GET", b"/a", [AUTH])
            assert (await client.response())[0].status_code == 200
            await asyncio.wait_for(upstream.closed.wait(), TIMEOUT)
            for _ in range(100):
                if upstream_mod.open_upstream_connections() == 0:
                    break
                await asyncio.sleep(0.01)
            assert upstream_mod.open_upstream_connections() == 0
            client.next_cycle()
            client.request(b"GET", b"/b", [AUTH])
            assert (await client.response())[0].status_code == 200
            assert upstream.connections == 2
            down.write_eof()
            await finished(task)
        no_leaks()

    run(main())


def test_cancelling_the_stream_closes_the_upstream_at_once_and_leaks_nothing() -> None:
    async def main() -> None:
        async def endless_watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = h11.Connection(h11.SERVER)
            await read_request(reader, conn)
            writer.write(conn.send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")]))
                         + conn.send(h11.Data(data=b"event\n")))
            await writer.drain()
            assert await reader.read() == b""

        baseline_tasks = len(asyncio.all_tasks())
        async with Upstream(endless_watch) as upstream:
            for _ in range(20):
                upstream.closed.clear()
                down = MemoryStream()
                task = asyncio.create_task(forward_connection(down, upstream.connect, TokenPassthrough()))
                client = Client(down)
                client.request(b"GET", b"/api/v1/pods?watch=1", [AUTH])
                assert (await client.event()).status_code == 200
                assert (await client.event()).data == b"event\n"
                assert http_forwarder.open_connections() == 1
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await asyncio.wait_for(upstream.closed.wait(), 1)
                no_leaks()
            await asyncio.sleep(0.05)
            assert len(asyncio.all_tasks()) <= baseline_tasks + 1  # the server's own handler may linger
        no_leaks()

    run(main())


def test_many_connections_leave_nothing_behind() -> None:
    async def main() -> None:
        fds_before = len(os.listdir("/proc/self/fd"))
        async with Upstream(lambda r, w: echo_apiserver(r, w, [])) as upstream:

            async def one(i: int) -> None:
                down = MemoryStream()
                task = asyncio.create_task(forward_connection(down, upstream.connect, TokenPassthrough()))
                client = Client(down)
                client.request(b"GET", f"/api/{i}".encode(), [AUTH])
                head, body = await client.response()
                assert head.status_code == 200 and json.loads(body)["target"] == f"/api/{i}"
                if i % 2:
                    down.write_eof()
                else:
                    client.next_cycle()
                    client.request(b"GET", b"/nope", [])  # refused: closes
                    assert (await client.response())[0].status_code == 401
                await finished(task)

            await asyncio.gather(*(one(i) for i in range(100)))
        await asyncio.sleep(0.05)
        no_leaks()
        assert len(os.listdir("/proc/self/fd")) <= fds_before + 2

    run(main())


def connection_tasks() -> list[asyncio.Task]:
    """Tasks of the forwarder's connections (downstream reader, idle watcher, pumps, pipe) still alive."""
    return [task for task in asyncio.all_tasks() if not task.done()
            and task.get_coro().__qualname__.startswith(("_Connection.", "Upstream."))]


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds; fails after TIMEOUT."""
    async with asyncio.timeout(TIMEOUT):
        while not condition():  # noqa: ASYNC110  # nothing signals a task set changing: poll it
            await asyncio.sleep(0)


def test_no_task_outlives_its_connection() -> None:
    """Whatever ends a connection, its tasks ended when forward_connection returns: no waiting after."""

    async def main() -> None:
        async with Upstream(lambda r, w: echo_apiserver(r, w, [])) as upstream:
            # Refused while the client's stream stays open: the reader was waiting on it.
            down = MemoryStream()
            task = asyncio.create_task(forward_connection(down, no_upstream, TokenPassthrough()))
            Client(down).request(b"GET", b"/api", [])
            await finished(task)
            assert connection_tasks() == []

            # Idle between requests (the watcher waits on the apiserver), then cancelled.
            down = MemoryStream()
            task = asyncio.create_task(forward_connection(down, upstream.connect, TokenPassthrough()))
            client = Client(down)
            client.request(b"GET", b"/a", [AUTH])
            assert (await client.response())[0].status_code == 200
            await until(lambda: any(t.get_coro().__qualname__ == "Upstream._watch" for t in connection_tasks()))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert connection_tasks() == []

            # A malformed request body ends it mid-exchange.
            down = MemoryStream()
            task = asyncio.create_task(forward_connection(down, upstream.connect, TokenPassthrough()))
            down.write(b"POST /x HTTP/1.1\r\nhost: k\r\nauthorization: Bearer t\r\ntransfer-encoding: chunked\r\n\r\n"
                       b"zz\r\n")
            await finished(task)
            assert connection_tasks() == []
        no_leaks()

    run(main())


# ---- TLS upstream (apiserver.py) ----------------------------------------------------------------


def make_pki(tmp: Path, names: list[str]) -> tuple[Path, Path, Path]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "apiserver")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = tmp / "ca.crt", tmp / "tls.crt", tmp / "tls.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_path, cert_path, key_path


def write_kubeconfig(tmp: Path, port: int, ca_path: Path, server_host: str = "127.0.0.1") -> Path:
    import base64

    path = tmp / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "clusters": [{"name": "k", "cluster": {
            "server": f"https://{server_host}:{port}",
            "certificate-authority-data": base64.b64encode(ca_path.read_bytes()).decode()}}],
        "users": [{"name": "u", "user": {"token": "proxy-own-token"}}],
    }))
    return path


async def tls_apiserver(tmp: Path, names: list[str], seen: list) -> tuple[asyncio.Server, Path]:
    ca_path, cert_path, key_path = make_pki(tmp, names)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                got = await read_request(reader, conn)
                if got is None:
                    return
                request, _ = got
                seen.append(request)
                if request.target == b"/version":
                    body = json.dumps({"gitVersion": "v1.99.0-test"}).encode()
                else:
                    body = b"{}"
                writer.write(respond(conn, 200, body))
                await writer.drain()
                conn.start_next_cycle()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=context)
    return server, ca_path


def test_tls_upstream_from_kubeconfig_and_own_version(tmp_path: Path) -> None:
    async def main() -> None:
        seen: list = []
        server, ca_path = await tls_apiserver(tmp_path, ["127.0.0.1"], seen)
        port = server.sockets[0].getsockname()[1]
        async with server:
            target = from_kubeconfig(write_kubeconfig(tmp_path, port, ca_path))
            assert await fetch_version(target) == "v1.99.0-test"
            assert (b"authorization", b"Bearer proxy-own-token") in seen[-1].headers

            down = MemoryStream()
            task = asyncio.create_task(forward_connection(down, target.connect, TokenPassthrough()))
            client = Client(down)
            client.request(b"GET", b"/api/v1/namespaces", [AUTH])
            head, _ = await client.response()
            assert head.status_code == 200
            assert (b"authorization", b"Bearer tok-123") in seen[-1].headers
            down.write_eof()
            await finished(task)
        no_leaks()

    run(main())


def test_tls_upstream_hostname_mismatch_is_502(tmp_path: Path) -> None:
    async def main() -> None:
        server, ca_path = await tls_apiserver(tmp_path, ["apiserver.example"], [])
        port = server.sockets[0].getsockname()[1]
        async with server:
            target = from_kubeconfig(write_kubeconfig(tmp_path, port, ca_path))
            down = MemoryStream()
            task = asyncio.create_task(forward_connection(down, target.connect, TokenPassthrough()))
            client = Client(down)
            client.request(b"GET", b"/api", [AUTH])
            head, body = await client.response()
            assert head.status_code == 502
            assert "certificate" in status_of(body)["message"].lower()
            await finished(task)
        no_leaks()

    run(main())


def test_kubeconfig_insecure_skip_verify_is_refused(tmp_path: Path) -> None:
    from clusterconnect.errors import StartupError

    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "k"}}],
        "clusters": [{"name": "k", "cluster": {"server": "https://x:6443", "insecure-skip-tls-verify": True}}],
    }))
    with pytest.raises(StartupError):
        from_kubeconfig(path)


# ---- the command ---------------------------------------------------------------------------------


def aadproxy(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLUSTERCONNECT_", "KUBERNETES_"))}
    return subprocess.run(
        [sys.executable, "-m", "clusterconnect.aadproxy.main", *args],
        capture_output=True, text=True, timeout=30, env=env,
    )


def test_plaintext_on_non_loopback_is_refused(tmp_path: Path) -> None:
    result = aadproxy("--listen", "0.0.0.0:0")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "plaintext" in result.stderr


def test_port_in_use_is_one_line_exit_2(tmp_path: Path) -> None:
    ca_path, _, _ = make_pki(tmp_path, ["127.0.0.1"])
    kubeconfig = write_kubeconfig(tmp_path, 6443, ca_path)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        result = aadproxy("--listen", f"127.0.0.1:{sock.getsockname()[1]}", "--kubeconfig", str(kubeconfig))
    finally:
        sock.close()
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "cannot listen" in result.stderr


# ---- the gRPC service (server.py) ----------------------------------------------------------------


def test_grpc_serve_and_info_end_to_end(tmp_path: Path) -> None:
    import grpc

    from clusterconnect.aadproxy.server import AuthProxyService
    from clusterconnect.streams import GrpcClientStream
    from clusterconnect.v1 import tunnel_pb2, tunnel_pb2_grpc

    async def main() -> None:
        seen: list = []
        api, ca_path = await tls_apiserver(tmp_path, ["127.0.0.1"], seen)
        target = from_kubeconfig(write_kubeconfig(tmp_path, api.sockets[0].getsockname()[1], ca_path))
        server = grpc.aio.server()
        tunnel_pb2_grpc.add_AuthProxyServicer_to_server(AuthProxyService(target, TokenPassthrough()), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with api, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = tunnel_pb2_grpc.AuthProxyStub(channel)
                info = await stub.Info(tunnel_pb2.InfoRequest())
                assert info.kubernetes_version == "v1.99.0-test" and info.auth_proxy_version

                # A stream that does not start with the binding is refused before any request.
                requests_before = len(seen)
                unbound = stub.Serve()
                await unbound.write(tunnel_pb2.Chunk(data=b"GET /api HTTP/1.1\r\nhost: k\r\n" + AUTH[0] + b": "
                                                     + AUTH[1] + b"\r\n\r\n"))
                assert await unbound.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert len(seen) == requests_before, "a request without a binding reached the apiserver"

                stream = GrpcClientStream(await bound_serve(stub))
                conn = h11.Connection(h11.CLIENT)
                for _ in range(2):
                    await stream.send(conn.send(h11.Request(method=b"GET", target=b"/api", headers=[
                        (b"host", b"k"), AUTH])) + conn.send(h11.EndOfMessage()))
                    while True:
                        event = conn.next_event()
                        if event is h11.NEED_DATA:
                            conn.receive_data(await stream.receive())
                        elif isinstance(event, h11.Response):
                            assert event.status_code == 200
                        elif isinstance(event, h11.EndOfMessage):
                            break
                    conn.start_next_cycle()
                await stream.send_eof()
                assert await asyncio.wait_for(stream.receive(), TIMEOUT) == b""

                # A cancelled stream ends the forwarder and its upstream connection.
                call = await bound_serve(stub)
                stream = GrpcClientStream(call)
                await stream.send(conn.send(h11.Request(method=b"GET", target=b"/api", headers=[
                    (b"host", b"k"), AUTH])) + conn.send(h11.EndOfMessage()))
                assert await asyncio.wait_for(stream.receive(), TIMEOUT)
                call.cancel()
                for _ in range(200):
                    if http_forwarder.open_connections() == 0:
                        break
                    await asyncio.sleep(0.01)
                no_leaks()
        finally:
            await server.stop(0)

    run(main())


# ---- the audit log (--audit-log, docs/audit.md) --------------------------------------------------


def test_every_request_is_one_audit_event_whatever_its_end(tmp_path: Path) -> None:
    from clusterconnect.aadproxy.audit import AuditLog, ConnectionAudit, ConnectionFacts

    path = tmp_path / "audit.log"
    sink = AuditLog.open(str(path))
    audit = ConnectionAudit(sink, ConnectionFacts(cluster="dev", trace_id="ab" * 16, source_ips=("10.0.0.9",)))

    async def main() -> None:
        seen: list = []
        async with Upstream(lambda r, w: echo_apiserver(r, w, seen)) as upstream:
            down = MemoryStream()
            task = asyncio.create_task(forward_connection(down, upstream.connect, TokenPassthrough(), audit=audit))
            client = Client(down)
            client.request(b"POST", b"/api/v1/namespaces/ns/configmaps?token=tok-123", [AUTH], b"{}")
            assert (await client.response())[0].status_code == 200
            client.next_cycle()
            client.request(b"DELETE", b"/api/v1/namespaces/ns/configmaps", [])  # no token: 401 here
            assert (await client.response())[0].status_code == 401
            await finished(task)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()  # nothing listens there now: the apiserver is unreachable, 502

        async def unreachable() -> SocketStream:
            return await open_socket_stream("127.0.0.1", port)

        down = MemoryStream()
        task = asyncio.create_task(forward_connection(down, unreachable, TokenPassthrough(), audit=audit))
        client = Client(down)
        client.request(b"GET", b"/version", [AUTH])
        assert (await client.response())[0].status_code == 502
        await finished(task)
        no_leaks()

    run(main())
    sink.close()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["verb"], e["responseStatus"]["code"], e["annotations"]["clusterconnect.io/authentication"])
            for e in events] == [("create", 200, "passthrough"), ("deletecollection", 401, "rejected"),
                                 ("get", 502, "passthrough")]
    assert events[0]["requestURI"] == "/api/v1/namespaces/ns/configmaps?token=%5Bredacted%5D"
    assert events[1]["annotations"]["clusterconnect.io/reason"] == "credential"
    assert all(e["user"] == {} and "impersonatedUser" not in e and e["sourceIPs"] == ["10.0.0.9"] for e in events)
    assert "tok-123" not in path.read_text()


def test_the_audit_log_on_standard_output() -> None:
    code = ("from clusterconnect.aadproxy.audit import AuditLog; s = AuditLog.open('-'); s.write({'kind': 'Event'});"
            " s.close(); print('after')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == '{"kind":"Event"}\nafter\n'
