"""A deadline on the head of a connection's first request (slowloris), without parsing HTTP.

Each connection holds a Dial: a stream at the relay, the agent and the auth proxy. A client that
opens connections and sends nothing, or a head a byte at a time, would hold them for ever. The
head of the first request ends at the first blank line (``\\r\\n\\r\\n``): finding it is a byte
search, not parsing, so the proxy stays a byte pipe. After that there is no deadline: a watch or
an exec session may be silent for hours, and so may a keep-alive connection between requests.
"""

from __future__ import annotations

import asyncio

from clusterconnect.errors import InvalidInput
from clusterconnect.streams import ByteStream

HEAD_END = b"\r\n\r\n"


class RequestHeadTimeout(InvalidInput):
    """The client did not send the head of its first request in time."""

    http_status = 408


class FirstRequestHead:
    """``stream`` (a ByteStream) whose ``receive()`` raises RequestHeadTimeout once ``timeout``
    seconds have passed, from now, without the first request's head having arrived."""

    def __init__(self, stream: ByteStream, timeout: float) -> None:
        self._stream = stream
        self._timeout = timeout
        self._deadline = asyncio.get_running_loop().time() + timeout
        self._complete = False
        self._tail = b""  # the last bytes seen, for a blank line split across two blocks
        self.received = 0  # bytes of the head so far

    async def receive(self) -> bytes:
        if self._complete:
            return await self._stream.receive()
        try:
            async with asyncio.timeout_at(self._deadline):
                data = await self._stream.receive()
        except TimeoutError:
            raise RequestHeadTimeout(
                f"no complete request head within {self._timeout:g}s of the TLS handshake"
                f" ({self.received} bytes received)"
            ) from None
        self.received += len(data)
        seen = self._tail + data
        # The end of input ends the deadline too: there is nothing left to wait for.
        self._complete = not data or HEAD_END in seen
        self._tail = seen[-(len(HEAD_END) - 1):]
        return data

    async def send(self, data: bytes) -> None:
        await self._stream.send(data)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def close(self) -> None:
        await self._stream.close()


def request_timeout_response(message: str) -> bytes:
    """A 408 that closes the connection, for a client that began a request and stalled."""
    body = f"clusterconnect proxy: {message}\n".encode()
    return (
        b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
