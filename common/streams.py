"""One direction-pair of bytes, whatever carries it: a socket (clusterconnect.socket_stream), or a
gRPC stream of Chunks (here).

Every hop of the tunnel is "take bytes from one ByteStream, give them to another". The semantics are
those of a TCP connection:
- ``receive()`` returns the next bytes, or ``b""`` once the peer will send no more (half-close);
- ``send()`` returns once the bytes were accepted by flow control (backpressure end to end);
- ``send_eof()`` half-closes our sending direction;
- ``close()`` ends everything (idempotent).
"""

from __future__ import annotations

import asyncio
from typing import Any, NoReturn, Protocol, cast

import grpc

from clusterconnect.errors import Unavailable
from clusterconnect.tasks import cancelling, gather_strict
from clusterconnect.v1 import tunnel_pb2

# What grpc.aio raises when the other end is gone or the RPC already ended.
# InternalError: ExecuteBatchError, a read or write from a task other than the handler while the RPC ended.
RPC_ENDED = (grpc.aio.AioRpcError, grpc.aio.UsageError, grpc.aio.InternalError, asyncio.InvalidStateError)

# grpc.aio's cost is per message, so sockets are read in large blocks (see docs/performance.md).
READ_SIZE = 256 * 1024

_EOF_CHUNK = tunnel_pb2.Chunk(eof=True)

# Bytes spliced by this process so far: [a->b, b->a] of splice(a, b). Every hop calls it with the
# client's side as ``a``, so [0] is toward the cluster and [1] back. Counted as each block passes
# (one list add per message, against the tens of microseconds grpc.aio spends on it), so a
# long watch shows its bytes as they flow, not at its end; read by the services' metrics.
SPLICED = [0, 0]


def raise_unless_peer_cancelled() -> NoReturn:
    """Called on CancelledError from a gRPC call's read or write: grpc.aio raises it also when the
    call was cancelled by someone other than this task (``call.cancel()`` elsewhere, or the other
    RPC's end of a splice). Unless this task is being cancelled, that is the stream going away
    (PeerGone); treated as our own cancellation, it would end one direction of a splice silently
    and leave the other one waiting for ever."""
    if cancelling():
        raise asyncio.CancelledError
    raise PeerGone("CANCELLED: the other end cancelled the stream")


class ByteStream(Protocol):
    async def receive(self) -> bytes: ...

    async def send(self, data: bytes) -> None: ...

    async def send_eof(self) -> None: ...

    async def close(self) -> None: ...


class PeerGone(Unavailable):
    """The other end of a stream went away without an orderly close."""


class GrpcClientStream:
    """Our side of a stream-stream call that we opened (``stub.Method(...)``), carrying Chunks."""

    def __init__(self, call: grpc.aio.StreamStreamCall[Any, Any]) -> None:
        self.call = call
        self._eof_sent = False

    def decode(self, message: Any) -> bytes | None:
        """The payload of a received message, or None for an in-band end of stream."""
        chunk = cast(tunnel_pb2.Chunk, message)
        return None if chunk.eof else chunk.data

    def encode(self, data: bytes) -> object:
        return tunnel_pb2.Chunk(data=data)

    async def receive(self) -> bytes:
        while True:
            try:
                message = await self.call.read()
            except grpc.aio.AioRpcError as exc:
                raise PeerGone(f"{exc.code().name}: {exc.details()}") from exc
            except RPC_ENDED as exc:
                raise PeerGone(str(exc)) from exc
            except asyncio.CancelledError:
                raise_unless_peer_cancelled()
            if message is grpc.aio.EOF:
                return b""
            data = self.decode(message)
            if data is None:
                return b""
            if data:  # an empty payload carries nothing
                return data

    async def send(self, data: bytes) -> None:
        try:
            await self.call.write(self.encode(data))
        except RPC_ENDED as exc:
            raise PeerGone(str(exc)) from exc
        except asyncio.CancelledError:
            raise_unless_peer_cancelled()

    async def send_eof(self) -> None:
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            await self.call.done_writing()
        except RPC_ENDED:
            pass

    async def close(self) -> None:
        self.call.cancel()

    async def finish(self, timeout: float = 5.0) -> None:
        """After a clean splice: let the server end the RPC (cancelling now would look like a failure)."""
        try:
            async with asyncio.timeout(timeout):
                await self.call.code()
        except TimeoutError:
            pass
        self.call.cancel()


class GrpcServerStream:
    """Our side of a stream-stream RPC that a peer opened (a handler's ``context``), carrying Chunks."""

    # End of our sending direction: the server cannot half-close in gRPC, so it says so in-band.
    eof_message: object = _EOF_CHUNK

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.context = context
        self._eof_sent = False

    def decode(self, message: Any) -> bytes | None:
        """The payload of a received message, or None for an in-band end of stream."""
        return None if message.eof else message.data

    def encode(self, data: bytes) -> object:
        return tunnel_pb2.Chunk(data=data)

    async def receive(self) -> bytes:
        while True:
            try:
                message = await self.context.read()
            except RPC_ENDED as exc:
                raise PeerGone(str(exc)) from exc
            except asyncio.CancelledError:  # e.g. read by the other RPC's task of a splice
                raise_unless_peer_cancelled()
            if message is grpc.aio.EOF:
                return b""
            data = self.decode(message)
            if data is None:
                return b""
            if data:  # an empty payload carries nothing
                return data

    async def _send(self, message: object) -> None:
        await self.context.write(message)

    async def _write(self, message: object) -> None:
        try:
            await self._send(message)
        except RPC_ENDED as exc:
            raise PeerGone(str(exc)) from exc
        except asyncio.CancelledError:
            raise_unless_peer_cancelled()

    async def send(self, data: bytes) -> None:
        await self._write(self.encode(data))

    async def send_eof(self) -> None:
        if not self._eof_sent:
            self._eof_sent = True
            await self._write(self.eof_message)

    async def close(self) -> None:
        # The RPC ends when its handler returns; nothing to do here.
        return None


async def pump(source: ByteStream, sink: ByteStream, direction: int = 0) -> int:
    """Copy one direction until EOF, then half-close the sink. Returns the bytes copied (also added
    to ``SPLICED[direction]`` as they pass)."""
    total = 0
    spliced = SPLICED
    while True:
        data = await source.receive()
        if not data:
            await sink.send_eof()
            return total
        size = len(data)
        total += size
        spliced[direction] += size
        await sink.send(data)


async def splice(a: ByteStream, b: ByteStream) -> tuple[int, int]:
    """Join two streams both ways until both directions ended.

    Both directions live in one TaskGroup: if either fails, the other is cancelled and the error
    propagates, so the whole chain is torn down. Returns (bytes a->b, bytes b->a).
    """
    forward, backward = await gather_strict(pump(a, b, 0), pump(b, a, 1))
    return forward, backward
