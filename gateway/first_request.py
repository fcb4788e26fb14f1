"""The head of a connection's first request, read with h11 only to take its bearer token.

kubectl sends its token on every request, so the first head names the caller the gateway Dials as.
Nothing is changed: every byte received (the head, and whatever came with it) goes on through the
Dial as it arrived, and the cluster's auth proxy parses the requests for real. After the first head
the gateway reads no HTTP at all: later requests, upgrades (exec, port-forward) and bodies pass as bytes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import h11

from clusterconnect.errors import InvalidInput, Unauthenticated
from clusterconnect.grpc_options import bearer_from_metadata
from clusterconnect.streams import ByteStream

# A head larger than this is refused (kubectl's are well under 4 KiB; the auth proxy's own limit is
# h11's default, 16 KiB, so nothing the cluster would take is refused here).
MAX_HEAD = 64 * 1024


class BadRequest(InvalidInput):
    """The first request is not HTTP/1.1 h11 accepts."""


class MissingToken(Unauthenticated):
    """The first request carries no single ``Authorization: Bearer`` token."""


class HeadTimeout(InvalidInput):
    """The head of the first request did not arrive in time (or the client left before sending it)."""

    http_status = 408


@dataclass(frozen=True)
class FirstRequest:
    raw: bytes  # every byte received so far, the head first, unchanged
    target: str  # the request target, for messages and for the shape of an error answer
    token: str | None  # the one bearer token of its Authorization header


class HeadParser:
    """Feed bytes; ``request`` is set once the head is complete. Pure: no I/O (tests/test_gateway_units.py)."""

    def __init__(self) -> None:
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.raw = bytearray()
        self.request: h11.Request | None = None

    def feed(self, data: bytes) -> bool:
        """True once the head is complete. ``b""`` is the end of input; BadRequest if it is not a head."""
        self.raw += data
        self._conn.receive_data(data)
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadRequest(f"not an HTTP/1.1 request: {exc}") from None
        if isinstance(event, h11.Request):
            self.request = event
            return True
        if event is h11.NEED_DATA:
            return False
        raise BadRequest("the connection ended before a request")  # ConnectionClosed

    def first_request(self) -> FirstRequest:
        assert self.request is not None
        headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in self.request.headers]
        return FirstRequest(bytes(self.raw), self.request.target.decode("latin-1"), bearer_from_metadata(headers))


async def read_first_request(stream: ByteStream, timeout: float) -> FirstRequest | None:
    """Receive until the first request's head is complete, within ``timeout`` seconds from now; None if
    the client hung up without sending a byte (a connection kubectl opened and never used)."""
    parser = HeadParser()
    try:
        async with asyncio.timeout(timeout):
            while True:
                data = await stream.receive()
                if not data and not parser.raw:
                    return None
                if parser.feed(data):
                    break
    except TimeoutError:
        raise HeadTimeout(f"no complete request head within {timeout:g}s of the TLS handshake"
                          f" ({len(parser.raw)} bytes received)") from None
    return parser.first_request()
