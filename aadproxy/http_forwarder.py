"""HTTP/1.1 between one downstream connection (kubectl, through the tunnel) and the apiserver.

One call of :func:`forward_connection` serves one downstream connection: many keep-alive requests,
each parsed strictly by h11 (server role), authenticated, and re-sent by a second h11 state machine
(client role) on this connection's own upstream connection. The upstream connection is opened at
the first authenticated request and reused only by later requests of the same downstream
connection; it is never shared.

Bodies stream both ways as they arrive: every parsed piece is sent on as soon as the bytes read so
far are used up, so a watch event or a ``logs -f`` line is never held back waiting for more data,
while a large read still leaves as one message. The request body and the response are pumped by two
tasks in one TaskGroup, since an apiserver may answer before it read the whole body.

After a 101 the connection is a raw byte pipe both ways. An upgrade request answered with anything
else closes both connections (CVE-2018-1002105: a failed upgrade must not leave an authenticated
upstream connection for whatever bytes come next).

Logs carry the method, path (without query), status and body bytes, never a header value: h11's
error messages can quote header values, so only error *types* are logged.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11

from clusterconnect.aadproxy import headers as hdr
from clusterconnect.aadproxy.authn import Authenticator, Reject
from clusterconnect.kstatus import status_body
from clusterconnect.logs import get_logger
from clusterconnect.streams import ByteStream, PeerGone
from clusterconnect.tasks import cancelling

log = get_logger(__name__)

# Largest request or response head (and chunk-size line) we buffer.
MAX_HEAD = 64 * 1024

# A header line starting with space or tab continues the previous one (RFC 9112 obs-fold).
_OBS_FOLD = re.compile(rb"\n[ \t]")

# After the client ended its side (EOF), the response in flight may take this long to finish. HTTP
# clients (Go's included) do not half-close, so this EOF almost always means the client is gone; the
# bound keeps a forgotten watch or ``logs -f`` from holding an apiserver connection for an hour.
EOF_GRACE = 10.0

ConnectUpstream = Callable[[], Awaitable[ByteStream]]

_counts = {"downstream": 0, "upstream": 0}


def open_connections() -> int:
    """Downstream connections being served now."""
    return _counts["downstream"]


def open_upstream_connections() -> int:
    """Upstream (apiserver) connections open now."""
    return _counts["upstream"]


class _Close(Exception):
    """Nothing more can be said on this connection: close both sides."""


@dataclass
class _Exchange:
    method: str
    path: str
    upgrade: bool
    status: int = 0
    response_started: bool = False
    response_bytes: int = 0
    request_bytes: int = 0
    request_sent: bool = False
    switched: bool = False
    close_after: bool = False


async def forward_connection(
    downstream: ByteStream, connect_upstream: ConnectUpstream, authenticator: Authenticator
) -> None:
    """Serve one downstream connection until it ends; never raises except CancelledError.

    ``connect_upstream`` opens a new connection to the apiserver (TLS verified by the caller); it is
    called at most once per live upstream connection, lazily.
    """
    connection = _Connection(downstream, connect_upstream, authenticator)
    _counts["downstream"] += 1
    try:
        await connection.run()
    except Exception as exc:
        kinds = _leaf_types(exc)
        if not all(issubclass(kind, (_Close, PeerGone)) for kind in kinds):
            log.warning("connection failed", error=",".join(sorted(k.__name__ for k in kinds)))
    finally:
        try:
            await connection.cleanup()
        finally:
            _counts["downstream"] -= 1


def _leaf_types(exc: BaseException) -> set[type[BaseException]]:
    if isinstance(exc, BaseExceptionGroup):
        found: set[type[BaseException]] = set()
        for inner in exc.exceptions:
            found |= _leaf_types(inner)
        return found
    return {type(exc)}


def _abort(stream: ByteStream) -> None:
    """Drop a socket-backed stream at once (no TLS close_notify, no waiting)."""
    abort = getattr(stream, "abort", None)
    if abort is not None:
        abort()


class _Connection:
    def __init__(
        self, downstream: ByteStream, connect_upstream: ConnectUpstream, authenticator: Authenticator
    ) -> None:
        self.downstream = downstream
        self.connect_upstream = connect_upstream
        self.authenticator = authenticator
        self.down = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.upstream: ByteStream | None = None
        self.up: h11.Connection | None = None
        self.watcher: asyncio.Task[None] | None = None
        # The only task that calls downstream.receive(): cancelling a gRPC read could lose a
        # message, cancelling a Queue.get cannot. One slot: at most one block read ahead.
        self.inbox: asyncio.Queue[bytes | BaseException] = asyncio.Queue(maxsize=1)
        self.reader: asyncio.Task[None] | None = None
        self.down_eof = False

    async def _read_downstream(self) -> None:
        while True:
            try:
                data = await self.downstream.receive()
            except PeerGone as exc:
                await self.inbox.put(exc)
                return
            await self.inbox.put(data)
            if not data:
                return

    async def _receive_down(self) -> bytes:
        """The next block from the client; b"" at EOF (and for ever after)."""
        if self.down_eof:
            return b""
        item = await self.inbox.get()
        if isinstance(item, BaseException):
            self.down_eof = True
            raise PeerGone(str(item))
        if not item:
            self.down_eof = True
        return item

    # ---- the request loop -------------------------------------------------------------------

    async def run(self) -> None:
        self.reader = asyncio.create_task(self._read_downstream())
        while True:
            request = await self._read_request_head()
            if request is None:
                return
            if not await self._handle(request):
                return
            if self.down.our_state is h11.DONE and self.down.their_state is h11.DONE:
                self.down.start_next_cycle()
            else:
                return

    async def _read_request_head(self) -> h11.Request | None:
        """The next request's head, or None when the connection is over (EOF or answered error)."""
        self._start_watcher()
        # h11 silently unfolds obsolete line folding and limits only incomplete heads; we refuse
        # both, so we keep the raw bytes of the head: whatever h11 had not processed yet, plus
        # what we feed it, minus what is left after.
        raw = bytearray(self.down.trailing_data[0])
        try:
            while True:
                try:
                    event = self.down.next_event()
                except h11.RemoteProtocolError as exc:
                    log.info("bad request", error=type(exc).__name__, status=exc.error_status_hint)
                    await self._answer(exc.error_status_hint, _head_error_message(exc.error_status_hint))
                    return None
                if event is h11.NEED_DATA:
                    data = await self._receive_down()
                    raw += data
                    self.down.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    head = raw[: len(raw) - len(self.down.trailing_data[0])]
                    if len(head) > MAX_HEAD:  # h11 bounds only heads still incomplete
                        log.info("bad request", error="HeadTooLarge", status=431)
                        await self._answer(431, _head_error_message(431))
                        return None
                    if _OBS_FOLD.search(head):
                        log.info("bad request", error="ObsoleteLineFolding", status=400)
                        await self._answer(400, "Bad Request: obsolete line folding in header")
                        return None
                    return event
                return None  # ConnectionClosed (downstream EOF between requests)
        finally:
            await self._stop_watcher()

    async def _handle(self, request: h11.Request) -> bool:
        """Answer one request; True if the connection may carry another."""
        started = time.monotonic()
        method = request.method.decode("ascii", "replace")
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        received = list(request.headers)
        if hdr.has_conflicting_framing(received):
            log.info("bad request", error="ContentLengthWithTransferEncoding", status=400)
            await self._answer(400, "Bad Request: both Content-Length and Transfer-Encoding")
            return False
        if request.method == b"CONNECT" or not request.target.startswith(b"/"):
            log.info("bad request", error="TargetForm", status=400)
            await self._answer(400, "Bad Request: only origin-form request targets are served")
            return False

        upgrade = hdr.upgrade_protocol(received)
        # h11 treats any Upgrade header as a switch proposal; so do we when deciding to close.
        proposed = upgrade is not None or bool(hdr.values(received, b"upgrade"))
        decision = await self.authenticator.authenticate(hdr.strip_hop_by_hop(received))
        if isinstance(decision, Reject):
            # The audit event: one per request (identity fields are bound by the authenticator).
            log.info("request", method=method, path=path, status=decision.status, bytes=0, request_bytes=0,
                     forwarded=False, duration_ms=round((time.monotonic() - started) * 1000, 1))
            await self._answer(decision.status, decision.message)
            return False

        send_headers = list(decision.headers)
        if hdr.is_chunked(received):
            send_headers.append((b"transfer-encoding", b"chunked"))
        if upgrade is not None:
            send_headers += hdr.upgrade_headers(upgrade)

        if self.upstream is None:
            try:
                await self._connect()
            except (TimeoutError, OSError, ssl.SSLError, PeerGone) as exc:
                message = _one_line(exc)
                log.warning("apiserver unreachable", error=message)
                await self._answer(502, f"auth proxy cannot reach the apiserver: {message}")
                return False
        assert self.up is not None and self.upstream is not None
        try:
            head = self.up.send(
                h11.Request(method=request.method, target=request.target, headers=send_headers)
            )
        except h11.LocalProtocolError:  # e.g. an HTTP/1.0 request without Host
            await self._answer(400, "Bad Request: request cannot be forwarded")
            return False
        try:
            await self.upstream.send(head)
        except PeerGone:
            log.warning("apiserver connection lost", error="send failed")
            await self._answer(502, "auth proxy lost its connection to the apiserver")
            return False

        exchange = _Exchange(method=method, path=path, upgrade=proposed)
        try:
            async with asyncio.TaskGroup() as group:
                body = group.create_task(self._pump_request_body(exchange))
                group.create_task(self._pump_response(exchange, body))
        finally:
            log.info(
                "request",
                method=method,
                path=path,
                status=exchange.status,
                bytes=exchange.response_bytes,
                request_bytes=exchange.request_bytes,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
            )

        if exchange.switched:
            await self._splice()
            return False
        if exchange.close_after or exchange.upgrade:
            return False
        if self.up.our_state is h11.DONE and self.up.their_state is h11.DONE:
            self.up.start_next_cycle()
        else:
            await self._drop_upstream()  # e.g. apiserver said Connection: close; reconnect lazily
        return True

    # ---- the two directions of one exchange -------------------------------------------------

    async def _pump_request_body(self, exchange: _Exchange) -> None:
        assert self.up is not None and self.upstream is not None
        out = bytearray()
        while True:
            try:
                event = self.down.next_event()
            except h11.RemoteProtocolError as exc:
                log.info("bad request body", error=type(exc).__name__)
                raise _Close from None
            if event is h11.NEED_DATA:
                if out and not await self._send_upstream(out):
                    return
                out.clear()
                self.down.receive_data(await self._receive_down())
            elif type(event) is h11.Data:
                exchange.request_bytes += len(event.data)
                out += self.up.send(h11.Data(data=event.data))
            elif type(event) is h11.EndOfMessage:
                out += self.up.send(h11.EndOfMessage())
                await self._send_upstream(out)
                exchange.request_sent = True
                break
            else:
                raise _Close
        if exchange.upgrade:
            return  # what follows belongs to the upgraded protocol: left for the splice
        # Watch the client while the response streams (this task is cancelled when it ends). Early
        # bytes of a next request go to h11's buffer, up to one head's worth; EOF starts the grace.
        buffered = 0
        while buffered <= MAX_HEAD:
            data = await self._receive_down()
            self.down.receive_data(data)
            if not data:
                await asyncio.sleep(EOF_GRACE)
                log.info("client gone, response cut", method=exchange.method, path=exchange.path)
                raise _Close
            buffered += len(data)
        await asyncio.Event().wait()

    async def _send_upstream(self, data: bytearray) -> bool:
        """Send request bytes; False if the apiserver stopped reading (its answer tells why)."""
        assert self.upstream is not None
        try:
            await self.upstream.send(bytes(data))
        except PeerGone:
            return False
        return True

    async def _pump_response(self, exchange: _Exchange, body: asyncio.Task[None]) -> None:
        assert self.up is not None and self.upstream is not None
        up, down = self.up, self.down
        out = bytearray()
        while True:
            try:
                event = up.next_event()
            except h11.RemoteProtocolError as exc:
                await self._upstream_failed(exchange, out, f"malformed response ({type(exc).__name__})")
            if event is h11.NEED_DATA:
                if out:
                    await self.downstream.send(bytes(out))
                    out.clear()
                try:
                    data = await self.upstream.receive()
                except PeerGone:
                    data = b""
                up.receive_data(data)
                continue
            kind = type(event)
            if kind is h11.InformationalResponse:
                if event.status_code == 101:
                    if self.down.their_state is not h11.MIGHT_SWITCH_PROTOCOL:
                        raise _Close  # cannot happen with a conforming apiserver: h11 checks it
                    protocol = hdr.values(event.headers, b"upgrade")
                    send = hdr.strip_hop_by_hop(event.headers) + hdr.upgrade_headers(
                        protocol[0] if protocol else b""
                    )
                    out += down.send(
                        h11.InformationalResponse(status_code=101, headers=send, reason=event.reason)
                    )
                    await self.downstream.send(bytes(out))
                    exchange.status = 101
                    exchange.switched = True
                    if not body.done():
                        await body  # only its last write of the (empty) body is left
                    return
                out += down.send(
                    h11.InformationalResponse(
                        status_code=event.status_code,
                        headers=hdr.strip_hop_by_hop(event.headers),
                        reason=event.reason,
                    )
                )
            elif kind is h11.Response:
                received = list(event.headers)
                if hdr.has_conflicting_framing(received):
                    await self._upstream_failed(
                        exchange, out, "response with both Content-Length and Transfer-Encoding"
                    )
                exchange.status = event.status_code
                exchange.response_started = True
                out += down.send(
                    h11.Response(
                        status_code=event.status_code,
                        headers=hdr.strip_hop_by_hop(received),
                        reason=event.reason,
                    )
                )
            elif kind is h11.Data:
                exchange.response_bytes += len(event.data)
                out += down.send(h11.Data(data=event.data))
            elif kind is h11.EndOfMessage:
                out += down.send(h11.EndOfMessage())  # trailers are hop-by-hop: dropped
                await self.downstream.send(bytes(out))
                if not body.done() and up.our_state is h11.DONE and not exchange.request_sent:
                    await body  # the request ended; only its last write is left
                if exchange.request_sent:
                    body.cancel()  # it only watches the client now
                elif not body.done():
                    # Answered before the request body ended: the rest of it cannot be framed
                    # for a next request, so this connection ends here.
                    body.cancel()
                    exchange.close_after = True
                return
            else:  # ConnectionClosed: the apiserver closed before answering
                await self._upstream_failed(exchange, out, "apiserver closed the connection")

    async def _upstream_failed(self, exchange: _Exchange, out: bytearray, reason: str) -> None:
        """The apiserver broke off: 502 if nothing of the answer went out yet; then close."""
        if exchange.response_started:
            if out:
                await self.downstream.send(bytes(out))
            log.info("apiserver ended response early", error=reason, method=exchange.method, path=exchange.path)
        else:
            log.warning("apiserver failed", error=reason, method=exchange.method, path=exchange.path)
            exchange.status = 502
            await self._answer(502, f"auth proxy: bad answer from the apiserver: {reason}")
        raise _Close

    # ---- after a 101 ------------------------------------------------------------------------

    async def _splice(self) -> None:
        assert self.up is not None and self.upstream is not None
        upstream = self.upstream
        down_rest, down_closed = self.down.trailing_data
        up_rest, up_closed = self.up.trailing_data
        if up_rest:
            await self.downstream.send(up_rest)
        if down_rest:
            await upstream.send(down_rest)

        async def one_way(
            receive: Callable[[], Awaitable[bytes]], sink: ByteStream, already_closed: bool
        ) -> None:
            while not already_closed:
                data = await receive()
                if not data:
                    break
                await sink.send(data)
            await sink.send_eof()

        async with asyncio.TaskGroup() as group:
            group.create_task(one_way(self._receive_down, upstream, down_closed))
            group.create_task(one_way(upstream.receive, self.downstream, up_closed))

    # ---- answers of our own -----------------------------------------------------------------

    async def _answer(self, status: int, message: str) -> None:
        """A Status JSON response with ``Connection: close``, if the state still allows one."""
        body = status_body(status, message)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            data = (
                self.down.send(h11.Response(status_code=status, headers=headers))
                + self.down.send(h11.Data(data=body))
                + self.down.send(h11.EndOfMessage())
            )
        except h11.LocalProtocolError:
            return
        await self.downstream.send(data)

    # ---- the upstream connection ------------------------------------------------------------

    async def _connect(self) -> None:
        self.upstream = await self.connect_upstream()
        self.up = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        _counts["upstream"] += 1

    async def _drop_upstream(self) -> None:
        stream = self.upstream
        if stream is None:
            return
        self.upstream = None
        self.up = None
        _counts["upstream"] -= 1
        if cancelling():
            _abort(stream)
        await stream.close()

    def _start_watcher(self) -> None:
        """While idle between requests, notice the apiserver closing (or babbling) at once."""
        if self.upstream is not None and self.watcher is None:
            self.watcher = asyncio.create_task(self._watch_idle_upstream(self.upstream))

    async def _watch_idle_upstream(self, stream: ByteStream) -> None:
        try:
            await stream.receive()  # any outcome while idle means the connection is unusable
        except PeerGone:
            pass
        if self.upstream is stream:
            _abort(stream)
            await self._drop_upstream()

    async def _stop_watcher(self) -> None:
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.cancel()
            await asyncio.wait([watcher])

    async def cleanup(self) -> None:
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.cancel()
        reader, self.reader = self.reader, None
        if reader is not None:
            reader.cancel()
        try:
            await self._drop_upstream()
            if not cancelling():
                try:
                    await self.downstream.send_eof()
                except PeerGone:
                    pass
        finally:
            await self.downstream.close()
            pending = [task for task in (watcher, reader) if task is not None]
            if pending:
                await asyncio.wait(pending)


def _head_error_message(status: int) -> str:
    if status == 431:
        return "Request Header Fields Too Large"
    if status == 501:
        return "Not Implemented: unsupported Transfer-Encoding"
    return "Bad Request: malformed HTTP request"


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]
