"""The relay's streams carry serialized Chunks untouched: it splices without decoding or re-encoding.

Dial and Accept are registered without (de)serializers, so each message arrives as the bytes of a
``Chunk`` and leaves as the same bytes. The one thing the relay must add is end-of-stream: a
client's ``done_writing`` becomes the serialized ``Chunk{eof: true}`` on the other stream, where
the relay is the server and cannot half-close otherwise.
"""

from __future__ import annotations

import asyncio

import grpc

from clusterconnect.streams import PeerGone
from clusterconnect.v1 import tunnel_pb2

EOF_MESSAGE = tunnel_pb2.Chunk(eof=True).SerializeToString()

_RPC_ENDED = (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)


class PassthroughStream:
    """A ByteStream whose "bytes" are whole serialized Chunk messages of a raw-registered RPC."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self.context = context
        self._eof_sent = False

    async def receive(self) -> bytes:
        while True:
            try:
                message = await self.context.read()
            except _RPC_ENDED as exc:
                raise PeerGone(str(exc)) from exc
            if message is grpc.aio.EOF:
                return b""
            if message:  # an empty Chunk carries nothing
                return message

    async def send(self, message: bytes) -> None:
        try:
            await self.context.write(message)
        except _RPC_ENDED as exc:
            raise PeerGone(str(exc)) from exc

    async def send_eof(self) -> None:
        if not self._eof_sent:
            self._eof_sent = True
            await self.send(EOF_MESSAGE)

    async def close(self) -> None:
        return None


def raw_stream_handler(service: str, methods: dict) -> grpc.GenericRpcHandler:
    """Register stream-stream ``methods`` of ``service`` with bytes in and bytes out."""
    return grpc.method_handlers_generic_handler(
        service, {name: grpc.stream_stream_rpc_method_handler(handler) for name, handler in methods.items()}
    )
