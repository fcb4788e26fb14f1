"""The relay's streams carry serialized Chunks untouched: it splices without decoding or re-encoding.

Dial and Accept are registered without (de)serializers, so each message arrives as the bytes of a
``Chunk`` and leaves as the same bytes. The one thing the relay must add is end-of-stream: a
client's ``done_writing`` becomes the serialized ``Chunk{eof: true}`` on the other stream, where
the relay is the server and cannot half-close otherwise. (A Chunk{eof} that a client sends itself
passes through as bytes and ends the stream at the far end.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import grpc

from clusterconnect.streams import GrpcServerStream
from clusterconnect.v1 import tunnel_pb2

# How long the Accept handler waits for a write of the Dial's that is still in flight once the call
# ended (it then fails or completes at once; the bound only guards against grpc never answering).
SETTLE_TIMEOUT = 5.0

# A handler of a raw stream-stream method: (request iterator, context) -> None.
StreamHandler: TypeAlias = Callable[[object, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[None]]


class PassthroughStream(GrpcServerStream):
    """A GrpcServerStream whose messages are whole serialized Chunks of a raw-registered RPC."""

    eof_message = tunnel_pb2.Chunk(eof=True).SerializeToString()

    def decode(self, message: bytes) -> bytes:
        return message

    def encode(self, data: bytes) -> bytes:
        return data


class ForeignPassthroughStream(PassthroughStream):
    """A PassthroughStream used from another RPC's task: the Dial handler splices the agent's Accept.

    Its writes are shielded from that task's cancellation. grpc.aio cannot take back a write
    cancelled half-way: after one, the RPC could no longer tell the agent that it ended, and the
    agent's side of the connection (and the auth proxy's) stayed open (tests/test_warm_streams.py).
    So a write in flight runs to its end, or to the RPC's end, which the Accept handler brings about.
    (Reads cancelled half-way do no such harm; shielding costs a task per message.)

    The task of a write left in flight belongs to the Accept handler, which awaits it in
    ``settle()`` once it ended its call (and cancels it if it still has not finished).
    """

    def __init__(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        super().__init__(context)
        self._in_flight: asyncio.Task[None] | None = None

    async def _send(self, message: object) -> None:
        self._in_flight = asyncio.ensure_future(self.context.write(message))
        await asyncio.shield(self._in_flight)

    async def settle(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait for a write still in flight; cancel it if it outlasts ``timeout``. Never raises:
        the write's outcome no longer matters, only that it is over."""
        write, self._in_flight = self._in_flight, None
        if write is None:
            return
        if not write.done():
            await asyncio.wait((write,), timeout=timeout)
            write.cancel()
        if not write.cancelled():
            write.exception()  # retrieved, so asyncio does not log it as never retrieved


def raw_stream_handler(service: str, methods: dict[str, StreamHandler]) -> grpc.GenericRpcHandler:
    """Register stream-stream ``methods`` of ``service`` with bytes in and bytes out."""
    return grpc.method_handlers_generic_handler(
        service, {name: grpc.stream_stream_rpc_method_handler(handler) for name, handler in methods.items()}
    )
