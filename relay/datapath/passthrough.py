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

# How long the Accept handler waits for its write toward the agent that is still in flight once the
# call ended (it then fails or completes at once; the bound only guards against grpc never answering).
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


class AgentStream(PassthroughStream):
    """The agent's Accept stream: written only by its own handler's task, which knows whether a write
    is in flight.

    grpc.aio cannot take back a write cancelled half-way: after one, the RPC could no longer tell the
    agent that it ended, and the agent's side of the connection (and the auth proxy's) stayed open
    (tests/test_warm_streams.py). So the Accept handler never cancels its pump toward the agent in
    the middle of a write: it ends its call first, which ends the write (``settle``).
    """

    def __init__(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        super().__init__(context)
        self.writing = False

    async def _send(self, message: object) -> None:
        self.writing = True
        try:
            await self.context.write(message)
        finally:
            self.writing = False


async def settle(pump: asyncio.Task[None] | None, stream: AgentStream, timeout: float = SETTLE_TIMEOUT) -> None:
    """Once the Accept call ended: end its pump toward the agent. A pump waiting to read the client is
    cancelled (a read cancelled half-way does no harm); one in a write is waited for, as the call's end
    ends it, and cancelled if it outlasts ``timeout``. Never raises: its outcome no longer matters."""
    if pump is None:
        return
    if not pump.done():
        if not stream.writing:
            pump.cancel()
        await asyncio.wait((pump,), timeout=timeout)
        pump.cancel()
    if not pump.cancelled():
        pump.exception()  # retrieved, so asyncio does not log it as never retrieved


def raw_stream_handler(service: str, methods: dict[str, StreamHandler]) -> grpc.GenericRpcHandler:
    """Register stream-stream ``methods`` of ``service`` with bytes in and bytes out."""
    return grpc.method_handlers_generic_handler(
        service, {name: grpc.stream_stream_rpc_method_handler(handler) for name, handler in methods.items()}
    )
