"""HTTP/1.1 between one downstream connection (kubectl, through the tunnel) and the apiserver.

One call of :func:`forward_connection` serves one downstream connection: many keep-alive requests,
each parsed strictly by llhttp (httptools; http_reader.py), checked (request_checks.py),
authenticated, and re-sent (http_writer.py) on this connection's own apiserver connection
(upstream.py), which is never shared; each answer is parsed by a ResponseReader of its own.

Bodies stream both ways as they arrive: every parsed piece is sent on as soon as the bytes read so
far are used up, so a watch event or a ``logs -f`` line is never held back waiting for more data,
while a large read still leaves as one message. The request body and the response are pumped by two
tasks in one TaskGroup, since an apiserver may answer before it read the whole body.

After a 101 the connection is a raw byte pipe both ways. An upgrade request answered with anything
else closes both connections (CVE-2018-1002105: a failed upgrade must not leave an authenticated
upstream connection for whatever bytes come next).

Every task of a connection (the downstream reader, the idle-upstream watcher, the pumps of each
exchange) runs in the connection's TaskGroup: when the connection ends they are cancelled and
awaited before :func:`forward_connection` returns.

Each connection ends with one log event: ``connection closed`` with its ``reason`` (:class:`End`; a
client hanging up is one of them, a normal end), or ``connection failed`` for an error nobody
expected. Logs carry the method, path (without query), status and body bytes, never a header value:
only error *types* (or the parser's fixed messages) are logged.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from clusterconnect.aadproxy import headers as hdr
from clusterconnect.aadproxy import http_writer as wr
from clusterconnect.aadproxy import metrics
from clusterconnect.aadproxy.audit import ConnectionAudit, RequestRecord
from clusterconnect.aadproxy.authn import Authenticator, Forward, Reject
from clusterconnect.aadproxy.http_reader import (
    CLOSED,
    END,
    MAX_HEAD,
    NEED_DATA,
    Data,
    ParseError,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
)
from clusterconnect.aadproxy.request_checks import Rejection, check_request, parse_failure
from clusterconnect.aadproxy.route import route
from clusterconnect.aadproxy.upstream import ApiserverGone, ConnectUpstream, Upstream
from clusterconnect.kstatus import status_body
from clusterconnect.logs import get_logger
from clusterconnect.streams import ByteStream, PeerGone
from clusterconnect.tasks import cancelling
from clusterconnect.tracing import current_span, end_request_span, request_span

log = get_logger(__name__)

# After the client ended its side (EOF), the response in flight may take this long to finish. HTTP
# clients (Go's included) do not half-close, so this EOF almost always means the client is gone; the
# bound keeps a forgotten watch or ``logs -f`` from holding an apiserver connection for an hour.
EOF_GRACE = 10.0

# A request head must be complete this long after its first byte (slowloris: a client dribbling a head
# byte by byte would hold the connection and its upstream for ever). kubectl writes a head at once, so
# only a broken or hostile client comes near it. Between keep-alive requests there is no limit: client-go
# keeps idle connections for reuse, and an idle connection costs nothing but its tunnel stream.
HEAD_TIMEOUT = 30.0

_open = [0]


def open_connections() -> int:
    """Downstream connections being served now."""
    return _open[0]


class End(enum.Enum):
    """Why a connection ended: the ``reason`` of its ``connection closed`` event."""

    CLIENT_CLOSED = "client closed"  # EOF, its stream gone or cancelled, ``Connection: close``: a normal end
    REFUSED = "request refused"  # we refused a request (answered, or its body was malformed)
    APISERVER_FAILED = "apiserver failed"  # unreachable, or broke off an answer or an upgraded stream
    NOT_REUSABLE = "not reusable"  # an upgrade refused, or answered before its request body ended
    UPGRADE_ENDED = "upgraded stream ended"
    STOPPING = "service stopping"


class _Close(Exception):
    """Internal control flow: nothing more can be said on this connection; close both sides."""

    def __init__(self, end: End) -> None:
        super().__init__(end.value)
        self.end = end


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
    request_ended: bool = False  # the request's end is written (maybe not yet sent)
    chunked: bool = False  # the response's body goes to the client in chunks of our own
    switched: bool = False
    close_after: bool = False
    decision: Forward | Reject | None = None  # for the audit event


def _never() -> bool:
    return False


async def forward_connection(
    downstream: ByteStream,
    connect_upstream: ConnectUpstream,
    authenticator: Authenticator,
    stopping: Callable[[], bool] = _never,
    head_timeout: float = HEAD_TIMEOUT,
    audit: ConnectionAudit | None = None,
) -> None:
    """Serve one downstream connection until it ends; never raises except CancelledError.

    ``connect_upstream`` opens a new connection to the apiserver (TLS verified by the caller); it is
    called at most once per live upstream connection, lazily. Being cancelled means the client's
    side went away (the agent cancels the stream when the client's connection ended), unless
    ``stopping()`` says the service is stopping.
    """
    _open[0] += 1
    end: End | None = None
    try:
        async with asyncio.TaskGroup() as tasks:
            connection = _Connection(downstream, connect_upstream, authenticator, tasks, head_timeout, audit)
            try:
                end = await connection.run()
            finally:
                await connection.close()
    except asyncio.CancelledError:
        end = End.STOPPING if stopping() else End.CLIENT_CLOSED
        raise
    except Exception as exc:
        end = _end_of(exc)
        if end is None:
            kinds = {type(leaf).__name__ for leaf in _leaves(exc)}
            log.warning("connection failed", error=",".join(sorted(kinds)))
    finally:
        # Before the gauge moves: a stats line with the connection gone comes after this event.
        if end is not None:
            log.info("connection closed", reason=end.value)
            current_span().set_attribute("clusterconnect.end_reason", end.value)
        _open[0] -= 1


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _end_of(exc: Exception) -> End | None:
    """The End an exception means, or None if it is a failure (something nobody expected)."""
    leaves = _leaves(exc)
    for leaf in leaves:
        if not isinstance(leaf, (_Close, ApiserverGone, PeerGone)):
            return None
    for leaf in leaves:
        if isinstance(leaf, _Close):
            return leaf.end
    for leaf in leaves:
        if isinstance(leaf, ApiserverGone):
            return End.APISERVER_FAILED
    # Every upstream PeerGone is caught where it happens: what is left is the client's stream.
    return End.CLIENT_CLOSED


class _Connection:
    """One downstream connection's state; its tasks run in ``tasks``, and :meth:`close` ends them."""

    def __init__(
        self,
        downstream: ByteStream,
        connect_upstream: ConnectUpstream,
        authenticator: Authenticator,
        tasks: asyncio.TaskGroup,
        head_timeout: float = HEAD_TIMEOUT,
        audit: ConnectionAudit | None = None,
    ) -> None:
        self.downstream = downstream
        self.audit = audit
        self.head_timeout = head_timeout
        self.authenticator = authenticator
        self.down = RequestReader()
        self.response_begun = False  # a response head went to the client for the current request
        self.upstream = Upstream(connect_upstream, tasks)
        # The only task that calls downstream.receive(): cancelling a gRPC read could lose a
        # message, cancelling a Queue.get cannot. One slot: at most one block read ahead.
        self.inbox: asyncio.Queue[bytes | BaseException] = asyncio.Queue(maxsize=1)
        self.down_eof = False
        self.answered = 0  # the status the client got for the request being handled (0: none yet)
        self.reader = tasks.create_task(self._read_downstream())

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

    async def run(self) -> End:
        while True:
            request = await self._read_request_head()
            if isinstance(request, End):
                return request
            end = await self._traced(request)
            if end is not None:
                return end
            if not request.keep_alive:
                return End.CLIENT_CLOSED  # it said Connection: close (or spoke HTTP/1.0)

    async def _read_request_head(self) -> RequestHead | End:
        """The next request's head, checked; or why the connection is over (EOF, or refused and answered)."""
        self.upstream.watch_idle()
        self.response_begun = False
        loop = asyncio.get_running_loop()
        # The head's clock starts at its first byte (already here if the client pipelined it).
        deadline = loop.time() + self.head_timeout if self.down.in_message else None
        try:
            while True:
                try:
                    event = self.down.next_event()
                except ParseError as exc:
                    return await self._refuse(parse_failure(exc.status_hint, exc.kind))
                if event is NEED_DATA:
                    try:
                        async with asyncio.timeout_at(deadline):  # _receive_down is cancel-safe (a Queue)
                            data = await self._receive_down()
                    except TimeoutError:
                        log.info("bad request", error="HeadTimeout", status=408)
                        await self._answer(408, f"Request Timeout: request head not complete within"
                                                f" {self.head_timeout:g} s")
                        return End.REFUSED
                    if deadline is None and data:
                        deadline = loop.time() + self.head_timeout
                    self.down.receive_data(data)
                    continue
                if type(event) is RequestHead:
                    rejection = check_request(event)
                    if rejection is not None:
                        return await self._refuse(rejection)
                    return event
                if event is CLOSED:
                    return End.CLIENT_CLOSED  # downstream EOF between requests
                return await self._refuse(parse_failure(400))  # cannot happen: a message begins with its head
        finally:
            await self.upstream.stop_watching()

    async def _refuse(self, rejection: Rejection) -> End:
        log.info("bad request", error=rejection.problem.value, status=rejection.status)
        await self._answer(rejection.status, rejection.reason)
        return End.REFUSED

    async def _traced(self, request: RequestHead) -> End | None:
        """``_handle`` in a span of its own, a child of the connection's (docs/tracing.md)."""
        method = request.method.decode("ascii", "replace")
        template = route(request.target.split(b"?", 1)[0].decode("ascii", "replace"))
        span = request_span(f"{method} {template}", **{"http.request.method": method, "http.route": template})
        self.answered = 0
        try:
            return await self._handle(request)
        finally:
            end_request_span(span, self.answered)

    async def _handle(self, request: RequestHead) -> End | None:
        """Answer one request; None if the connection may carry another, else why it ends."""
        method = request.method.decode("ascii", "replace")
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        received = list(request.headers)
        # Any Upgrade header is a switch proposal when deciding to close (as h11 had it).
        proposed = hdr.upgrade_protocol(received) is not None or bool(hdr.values(received, b"upgrade"))
        exchange = _Exchange(method=method, path=path, upgrade=proposed)
        received_at = time.time()
        try:
            return await self._exchange(request, exchange)
        finally:
            # Also when cancelled (the client went away): the status is whatever it got, 0 if nothing.
            if self.audit is not None:
                self.audit.record(_record(request, exchange, received_at))

    async def _exchange(self, request: RequestHead, exchange: _Exchange) -> End | None:
        started = time.monotonic()
        method, path, proposed = exchange.method, exchange.path, exchange.upgrade
        received = list(request.headers)
        upgrade = hdr.upgrade_protocol(received)
        decision = await self.authenticator.authenticate(hdr.strip_hop_by_hop(received))
        exchange.decision = decision
        verb = metrics.verb(request.method, request.target, proposed)
        if isinstance(decision, Reject):
            exchange.status = decision.status
            metrics.authentication_failed(decision.reason)
            metrics.request(verb, decision.status, 0, 0)
            # The audit event: one per request (identity fields are bound by the authenticator).
            log.info("request", method=method, path=path, status=decision.status, bytes=0, request_bytes=0,
                     forwarded=False, duration_ms=round((time.monotonic() - started) * 1000, 1))
            await self._answer(decision.status, decision.message)
            return End.REFUSED

        send_headers = list(decision.headers)
        if hdr.is_chunked(received):
            send_headers.append((b"transfer-encoding", b"chunked"))
        if upgrade is not None:
            send_headers += hdr.upgrade_headers(upgrade)

        upstream = self.upstream
        if upstream.stream is None:
            try:
                await upstream.open()
            except (TimeoutError, OSError, ssl.SSLError, PeerGone) as exc:
                message = _one_line(exc)
                log.warning("apiserver unreachable", error=message)
                metrics.request(verb, 502, 0, 0)
                exchange.status = 502
                await self._answer(502, f"auth proxy cannot reach the apiserver: {message}")
                return End.APISERVER_FAILED
        stream = upstream.stream
        assert stream is not None
        up = ResponseReader(head_only=request.method == b"HEAD")
        try:
            head = wr.request_head(request.method, request.target, send_headers)
        except wr.WriteError:  # e.g. an impersonation value from a claim with a control character
            exchange.status = 400
            await self._answer(400, "Bad Request: request cannot be forwarded")
            return End.REFUSED
        try:
            await stream.send(head)
        except PeerGone:
            log.warning("apiserver connection lost", error="send failed")
            exchange.status = 502
            await self._answer(502, "auth proxy lost its connection to the apiserver")
            return End.APISERVER_FAILED

        try:
            async with asyncio.TaskGroup() as group:
                body = group.create_task(self._pump_request_body(exchange, stream, hdr.is_chunked(received)))
                group.create_task(self._pump_response(exchange, request, body, stream, up))
        finally:
            self.answered = exchange.status
            metrics.request(verb, exchange.status, exchange.request_bytes, exchange.response_bytes)
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
            down = self.down
            await upstream.pipe(self._receive_down, self.downstream, bytes(down.trailing), down.closed,
                                bytes(up.trailing), up.closed)
            return End.UPGRADE_ENDED
        if exchange.close_after or exchange.upgrade or not exchange.request_ended:
            return End.NOT_REUSABLE
        if not (up.reusable and exchange.request_sent):
            await upstream.drop()  # e.g. apiserver said Connection: close; reconnect lazily
        return None

    # ---- the two directions of one exchange -------------------------------------------------

    async def _pump_request_body(self, exchange: _Exchange, stream: ByteStream, chunked: bool) -> None:
        down = self.down
        out = bytearray()
        while True:
            try:
                event = down.next_event()
            except ParseError as exc:
                log.info("bad request body", error=type(exc).__name__)
                raise _Close(End.REFUSED) from None
            if event is NEED_DATA:
                if out and not await _send_upstream(stream, out):
                    return
                out.clear()
                down.receive_data(await self._receive_down())
            elif type(event) is Data:
                exchange.request_bytes += len(event.data)
                out += wr.chunk(event.data) if chunked else event.data
            elif event is END:
                if chunked:
                    out += wr.LAST_CHUNK
                exchange.request_ended = True
                await _send_upstream(stream, out)
                exchange.request_sent = True
                break
            else:
                raise _Close(End.REFUSED)
        if exchange.upgrade:
            return  # what follows belongs to the upgraded protocol: left for the pipe
        # Watch the client while the response streams (this task is cancelled when it ends). Early
        # bytes of a next request go to the parser, up to one head's worth; EOF starts the grace.
        buffered = 0
        while buffered <= MAX_HEAD:
            data = await self._receive_down()
            down.receive_data(data)
            if not data:
                await asyncio.sleep(EOF_GRACE)
                log.info("client gone, response cut", method=exchange.method, path=exchange.path)
                raise _Close(End.CLIENT_CLOSED)
            buffered += len(data)
        await asyncio.Event().wait()

    async def _pump_response(
        self, exchange: _Exchange, request: RequestHead, body: asyncio.Task[None], stream: ByteStream,
        up: ResponseReader,
    ) -> None:
        out = bytearray()
        while True:
            try:
                event = up.next_event()
            except ParseError as exc:
                await self._upstream_failed(exchange, out, f"malformed response ({exc})")
            if event is NEED_DATA:
                if out:
                    await self.downstream.send(bytes(out))
                    out.clear()
                try:
                    data = await stream.receive()
                except PeerGone:
                    data = b""
                up.receive_data(data)
            elif type(event) is Data:
                exchange.response_bytes += len(event.data)
                out += wr.chunk(event.data) if exchange.chunked else event.data
            elif type(event) is ResponseHead:
                if event.status == 101:
                    await self._switch(exchange, body, event, out)
                    return
                received = event.headers
                if hdr.has_conflicting_framing(received):  # llhttp refuses it already
                    await self._upstream_failed(
                        exchange, out, "response with both Content-Length and Transfer-Encoding"
                    )
                send = hdr.strip_hop_by_hop(received)
                if event.status >= 200:
                    exchange.status = event.status
                    exchange.response_started = True
                    self.response_begun = True
                    send = self._final_framing(exchange, request, event, send)
                out += wr.response_head(event.status, event.reason, send)
            elif event is END:
                if exchange.chunked:
                    out += wr.LAST_CHUNK  # trailers are hop-by-hop: dropped
                await self.downstream.send(bytes(out))
                if not body.done() and exchange.request_ended and not exchange.request_sent:
                    await body  # the request ended; only its last write is left
                if exchange.request_sent:
                    body.cancel()  # it only watches the client now
                elif not body.done():
                    # Answered before the request body ended: the rest of it cannot be framed
                    # for a next request, so this connection ends here.
                    body.cancel()
                    exchange.close_after = True
                return
            else:  # CLOSED: the apiserver closed before answering
                await self._upstream_failed(exchange, out, "apiserver closed the connection")

    @staticmethod
    def _final_framing(
        exchange: _Exchange, request: RequestHead, response: ResponseHead, send: list[hdr.Header]
    ) -> list[hdr.Header]:
        """The final response's headers toward the client, with the framing of its body there.

        A Content-Length body passes unchanged. A chunked one (its Transfer-Encoding is hop-by-hop)
        or one read until the apiserver closes is chunked again for an HTTP/1.1 client, and sent
        until we close for an HTTP/1.0 one; what has no body (HEAD, 204, 304) keeps its headers.
        """
        names = {name for name, _ in response.headers}
        has_body = (request.method != b"HEAD" and response.status not in (204, 304)
                    and b"content-length" not in names)
        if has_body and request.http_version == b"1.1":
            exchange.chunked = True
            send.append((b"transfer-encoding", b"chunked"))
        if not request.keep_alive:  # always so for HTTP/1.0: the body then ends when we close
            send.append((b"connection", b"close"))
        return send

    async def _switch(
        self, exchange: _Exchange, body: asyncio.Task[None], event: ResponseHead, out: bytearray
    ) -> None:
        """Pass the apiserver's 101 on; the pipe takes over once the exchange's tasks ended."""
        # Only a request that llhttp read as an upgrade (Connection: Upgrade and Upgrade) may
        # switch: its parser stopped at the head, so nothing after it was read as HTTP.
        if not self.down.upgraded or not exchange.upgrade:
            raise _Close(End.APISERVER_FAILED)
        protocol = hdr.values(event.headers, b"upgrade")
        send = hdr.strip_hop_by_hop(event.headers) + hdr.upgrade_headers(protocol[0] if protocol else b"")
        out += wr.response_head(101, event.reason, send)
        self.response_begun = True
        await self.downstream.send(bytes(out))
        exchange.status = 101
        exchange.switched = True
        if not body.done():
            await body  # only its last write of the (empty) body is left

    async def _upstream_failed(self, exchange: _Exchange, out: bytearray, reason: str) -> NoReturn:
        """The apiserver broke off: 502 if nothing of the answer went out yet; then close."""
        if exchange.response_started:
            if out:
                await self.downstream.send(bytes(out))
            log.info("apiserver ended response early", error=reason, method=exchange.method, path=exchange.path)
        else:
            log.warning("apiserver failed", error=reason, method=exchange.method, path=exchange.path)
            exchange.status = 502
            await self._answer(502, f"auth proxy: bad answer from the apiserver: {reason}")
        raise _Close(End.APISERVER_FAILED)

    # ---- answers of our own -----------------------------------------------------------------

    async def _answer(self, status: int, message: str) -> None:
        """A Status JSON response with ``Connection: close``, if the state still allows one."""
        if self.response_begun:
            return  # the client has (part of) another answer to this request
        body = status_body(status, message)
        data = wr.complete_response(status, [(b"content-type", b"application/json"), (b"connection", b"close")], body)
        self.response_begun = True
        self.answered = status
        await self.downstream.send(data)

    # ---- the end ----------------------------------------------------------------------------

    async def close(self) -> None:
        """Cancel this connection's tasks (their group awaits them), close upstream, then downstream."""
        self.reader.cancel()
        try:
            await self.upstream.close()
            if not cancelling():
                try:
                    await self.downstream.send_eof()
                except PeerGone:
                    pass
        finally:
            await self.downstream.close()


async def _send_upstream(stream: ByteStream, data: bytearray) -> bool:
    """Send request bytes; False if the apiserver stopped reading (its answer tells why)."""
    try:
        await stream.send(bytes(data))
    except PeerGone:
        return False
    return True


def _record(request: RequestHead, exchange: _Exchange, received_at: float) -> RequestRecord:
    """The audit facts of one exchange (the caller as the authenticator told it, never a header value)."""
    decision = exchange.decision
    if isinstance(decision, Reject):
        user, impersonated, authentication, reason = decision.user, None, "rejected", decision.reason
    elif decision is not None:
        user, impersonated, reason = decision.user, decision.impersonated, None
        authentication = "oidc" if decision.user is not None else "passthrough"
    else:  # cancelled while authenticating (the client went away): nobody was told anything
        user, impersonated, authentication, reason = None, None, "none", None
    return RequestRecord(method=exchange.method, target=request.target.decode("ascii", "replace"),
                         code=exchange.status, received=received_at, completed=time.time(), user=user,
                         impersonated=impersonated, authentication=authentication, reason=reason)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]
