"""A TCP or TLS connection as a ByteStream, driven through its transport directly.

asyncio.StreamReader copies every received block into its buffer and out again, and pauses and
resumes the transport each time that buffer passes twice its limit: about 15 % of the auth proxy's
CPU during a large LIST (docs/performance.md). Here the protocol keeps the blocks as the transport
delivered them and ``receive()`` hands them on: one block as it is, several that queued up joined
into one (up to READ_SIZE), so a burst still leaves as one large message.

Backpressure both ways: reading pauses while more than HIGH_WATER bytes wait for ``receive()``, and
``send()`` returns once the transport's write buffer is below its high-water mark again.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable

from clusterconnect.streams import READ_SIZE, PeerGone

# Received bytes waiting for receive() before the transport stops reading (StreamReader's default
# pause point with the 256 KiB limit the auth proxy used).
HIGH_WATER = 2 * READ_SIZE

# How long close() waits for an orderly end (TLS close_notify) before dropping the connection.
CLOSE_TIMEOUT = 5.0


class SocketStream(asyncio.Protocol):
    """Both the asyncio protocol of one connection and its ByteStream.

    ``on_connected`` (for servers) is called once the connection is made, TLS handshake included.
    """

    def __init__(self, on_connected: Callable[[SocketStream], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self._on_connected = on_connected
        self._blocks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._error: BaseException | None = None
        self._lost = False
        self._reading_paused = False
        self._writing_paused = False
        self._data_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._lost_waiter: asyncio.Future[None] | None = None
        self._closed = False

    # ---- protocol: called by the transport --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are Transports without the subclass
        if self._on_connected is not None:
            on_connected, self._on_connected = self._on_connected, None
            on_connected(self)

    def data_received(self, data: bytes) -> None:
        if not data:
            return
        self._blocks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        _wake(self._data_waiter)

    def eof_received(self) -> bool:
        self._eof = True
        _wake(self._data_waiter)
        # Keep the plain TCP transport open for our half of the conversation (half-close); TLS
        # transports close on EOF whatever we answer.
        return self.transport is not None and self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._eof = True
        self._error = exc
        _wake(self._data_waiter)
        _wake(self._drain_waiter)
        _wake(self._lost_waiter)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        _wake(self._drain_waiter)

    # ---- ByteStream -------------------------------------------------------------------------

    async def receive(self) -> bytes:
        """The next bytes; b"" once the peer ended its side. Cancelling it loses nothing."""
        if self._data_waiter is not None:
            raise RuntimeError("receive() called while another receive() is waiting")
        while not self._blocks:
            if self._error is not None:
                raise PeerGone(_describe(self._error))
            if self._eof:
                return b""
            self._data_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._data_waiter
            finally:
                self._data_waiter = None
        data = self._blocks.popleft()
        if self._blocks and len(data) < READ_SIZE:
            parts = [data]
            size = len(data)
            while self._blocks and size + len(self._blocks[0]) <= READ_SIZE:
                block = self._blocks.popleft()
                parts.append(block)
                size += len(block)
            data = b"".join(parts)
        self._buffered -= len(data)
        if self._reading_paused and self._buffered <= HIGH_WATER // 2 and not self._lost:
            self._reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return data

    async def send(self, data: bytes) -> None:
        """Write ``data``; returns once the transport's buffer is below its high-water mark."""
        transport = self.transport
        if self._lost or transport is None or transport.is_closing():
            raise PeerGone(_describe(self._error) if self._error else "connection closed")
        transport.write(data)
        while self._writing_paused and not self._lost:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self._lost:  # what we wrote may not have left
            raise PeerGone(_describe(self._error) if self._error else "connection lost")

    async def send_eof(self) -> None:
        transport = self.transport
        if transport is None or self._lost:
            return
        # TLS cannot half-close; once our side is done the connection is done.
        if transport.can_write_eof() and not transport.is_closing():
            try:
                transport.write_eof()
            except (ConnectionError, OSError):
                pass
        else:
            await self.close()

    async def close(self) -> None:
        """End the connection (idempotent): an orderly close, or an abort after CLOSE_TIMEOUT."""
        if self._closed:
            return
        self._closed = True
        transport = self.transport
        if transport is None or self._lost:
            return
        self._lost_waiter = asyncio.get_running_loop().create_future()
        transport.close()
        try:
            # TLS close_notify to a vanished peer would wait for ever.
            await asyncio.wait_for(asyncio.shield(self._lost_waiter), CLOSE_TIMEOUT)
        except TimeoutError:
            transport.abort()

    def abort(self) -> None:
        """Drop the connection at once (no TLS close_notify, no waiting)."""
        if self.transport is not None:
            self.transport.abort()

    def ended(self) -> bool:
        """True once the peer ended its side and everything it sent was received, or the connection
        is closing."""
        return (self._eof and not self._blocks) or self.transport is None or self.transport.is_closing()


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def open_socket_stream(
    host: str, port: int, *, tls: ssl.SSLContext | None = None, server_hostname: str | None = None
) -> SocketStream:
    """Connect (and complete the TLS handshake, with ``tls``)."""
    _, stream = await asyncio.get_running_loop().create_connection(
        SocketStream, host, port, ssl=tls, server_hostname=server_hostname if tls is not None else None
    )
    return stream
