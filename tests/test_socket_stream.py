"""SocketStream on real loopback sockets: the ByteStream semantics the proxies rely on."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from clusterconnect.socket_stream import HIGH_WATER, open_socket_stream
from clusterconnect.streams import READ_SIZE, PeerGone


@pytest.fixture(params=["uvloop", "asyncio"])
def connected(request):
    """``connected(body)`` runs ``body(stream, peer)``: our SocketStream connected to a plain blocking
    socket the test drives by hand, on the event loop the services use (uvloop) and on asyncio's own."""
    runner = uvloop.run if request.param == "uvloop" else asyncio.run

    def run(body) -> None:
        async def main() -> None:
            listener = socket.create_server(("127.0.0.1", 0))
            try:
                stream = await open_socket_stream("127.0.0.1", listener.getsockname()[1])
                peer, _ = await asyncio.to_thread(listener.accept)
            finally:
                listener.close()
            try:
                await body(stream, peer)
            finally:
                peer.close()
                await stream.close()

        runner(asyncio.wait_for(main(), 20))

    return run


async def _until(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 -- the stream's internals have no event to wait on
            await asyncio.sleep(0.001)


def test_blocks_that_queued_up_leave_as_one_up_to_read_size(connected):
    async def body(stream, peer):
        peer.sendall(b"a" * 1000)
        await _until(lambda: stream._buffered == 1000)
        peer.sendall(b"b" * 1000)
        await _until(lambda: stream._buffered == 2000)
        assert await stream.receive() == b"a" * 1000 + b"b" * 1000

        peer.sendall(b"c" * (READ_SIZE + 10))
        await _until(lambda: stream._buffered == READ_SIZE + 10)
        # However the transport cut it, consecutive blocks leave joined as long as the message stays within
        # READ_SIZE (both loops read at most 256 KiB at a time, so no block is larger alone).
        queued = [len(block) for block in stream._blocks]
        received = []
        while sum(received) < READ_SIZE + 10:
            block = await stream.receive()
            assert block == b"c" * len(block)
            received.append(len(block))
        assert received == _joined_up_to_read_size(queued), queued
        assert max(received) <= READ_SIZE, received

    connected(body)


def _joined_up_to_read_size(sizes: list[int]) -> list[int]:
    """Consecutive blocks joined while the message stays within READ_SIZE."""
    messages: list[int] = []
    for size in sizes:
        if messages and messages[-1] + size <= READ_SIZE:
            messages[-1] += size
        else:
            messages.append(size)
    return messages


def test_reading_pauses_above_high_water_and_resumes_once_drained(connected):
    async def body(stream, peer):
        peer.setblocking(False)
        payload = b"x" * (HIGH_WATER * 4)
        sent = 0

        def send_some() -> bool:
            nonlocal sent
            try:
                sent += peer.send(payload[sent:])
            except BlockingIOError:
                pass
            return stream._reading_paused

        await _until(send_some)
        assert stream._buffered <= HIGH_WATER + READ_SIZE  # bounded: no unbounded queue
        received = 0
        while received < len(payload):
            if sent < len(payload):
                send_some()
            received += len(await stream.receive())
        assert not stream._reading_paused

    connected(body)


def test_a_cancelled_receive_loses_nothing(connected):
    async def body(stream, peer):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await stream.receive()
        peer.sendall(b"after")
        assert await stream.receive() == b"after"

    connected(body)


def test_half_close_both_ways_on_plain_tcp(connected):
    async def body(stream, peer):
        peer.sendall(b"last words")
        peer.shutdown(socket.SHUT_WR)
        assert await stream.receive() == b"last words"
        assert await stream.receive() == b""
        await stream.send(b"still open")  # our direction is still ours
        await stream.send_eof()
        received = b""
        while chunk := await asyncio.to_thread(peer.recv, 100):
            received += chunk
        assert received == b"still open"

    connected(body)


def test_a_reset_is_peer_gone_and_close_is_idempotent(connected):
    async def body(stream, peer):
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.close()  # RST
        with pytest.raises(PeerGone):
            while await stream.receive():
                pass
        with pytest.raises(PeerGone):
            await stream.send(b"x")
        await stream.close()
        await stream.close()
        assert stream.ended()

    connected(body)


def test_a_second_concurrent_receive_is_refused(connected):
    async def body(stream, peer):
        first = asyncio.create_task(stream.receive())
        await _until(lambda: stream._data_waiter is not None)
        with pytest.raises(RuntimeError):
            await stream.receive()
        peer.sendall(b"one")
        assert await first == b"one"

    connected(body)
