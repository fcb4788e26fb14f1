"""HTTP/1.1 messages parsed by llhttp (httptools), as a stream of events: no I/O, testable without sockets.

httptools calls back as it parses; :class:`RequestReader` and :class:`ResponseReader` turn those calls
into h11-style events (a head, body :class:`Data`, :data:`END`, :data:`CLOSED` at EOF between
messages, :data:`NEED_DATA`), returned one at a time by ``next_event()``. A parse error is queued
behind the events before it and raised as :class:`ParseError` when reached, so what was parsed
before it is still handled in order (a ``Connection: close`` request followed by junk ends as a
close, not as an error).

What llhttp leaves to the caller, and is done here (each is what h11 did):

- header names are lowercased; a value's trailing whitespace is dropped (llhttp drops only the
  leading one); header lines after the body (chunked trailers) are dropped: they are hop-by-hop;
- a request line must be exactly ``METHOD SP target SP HTTP/1.x``: llhttp also takes several spaces,
  ``RTSP/1.0``, ``HTTP/2.0`` and empty lines before it; the canonical line must appear in the bytes
  the head came in (first, unless a message ended before it in the same block);
- the size of a head: llhttp has no limit. A head still incomplete after MAX_HEAD bytes fed is
  refused (431); a complete head reports its ``size`` (request_checks.py refuses one over MAX_HEAD);
- a response to HEAD has no body whatever its Content-Length (httptools cannot tell llhttp), so a
  ResponseReader serves one exchange: the forwarder makes one per request;
- EOF: the end of a response read until the connection closes (httptools has no ``llhttp_finish``);
  an incomplete message at EOF is a ParseError;
- after an upgrade (a request with ``Connection: Upgrade`` and ``Upgrade``, a 101 response) llhttp
  stops at the end of the head: the rest, and everything received after, is ``trailing``, for the
  pipe. llhttp reads no body of an upgrade request (request_checks.py refuses one that has one).

Everything llhttp checks itself stays with it: one Content-Length, not with Transfer-Encoding, no
obs-fold, no control characters, tokens for methods and header names, chunk syntax.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

import httptools

from clusterconnect.aadproxy.headers import Header

# Largest request or response head we buffer (see request_checks.py, which refuses larger complete ones).
MAX_HEAD = 64 * 1024


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    headers: list[Header]  # names lowercase, values without surrounding whitespace
    http_version: bytes  # b"1.1" or b"1.0"
    keep_alive: bool  # the client lets the connection carry another request after this one
    upgrade: bool  # llhttp stopped at the head: what follows is another protocol (``trailing``)
    size: int  # bytes of the head (request line to the empty line)


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    headers: list[Header]
    http_version: bytes
    keep_alive: bool


@dataclass(slots=True)
class Data:
    data: bytes


class _Marker:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA: Final = _Marker("NEED_DATA")  # nothing more until receive_data()
END: Final = _Marker("END")  # the message ended (its body complete)
CLOSED: Final = _Marker("CLOSED")  # EOF between messages

Event = RequestHead | ResponseHead | Data | _Marker


class ParseError(Exception):
    """The peer's bytes are not an acceptable HTTP/1.1 message.

    ``status_hint`` is what a server answers (400, 431, 501); ``kind`` names a rule the answer may
    cite (request_checks.parse_failure). The message is llhttp's fixed text or ours: it never quotes
    the peer's bytes, so it may be logged.
    """

    def __init__(self, message: str, status_hint: int = 400, kind: str | None = None) -> None:
        super().__init__(message)
        self.status_hint = status_hint
        self.kind = kind


OBS_FOLD = "obs-fold"
CONFLICTING_FRAMING = "conflicting-framing"
HEAD_TOO_LARGE = "head-too-large"


def _parse_error(exc: httptools.HttpParserError) -> ParseError:
    """llhttp's error as ours, with the status and rule h11 gave the same input."""
    message = str(exc) or type(exc).__name__
    if "Transfer-Encoding" in message and "Content-Length" in message:
        return ParseError(message, 400, CONFLICTING_FRAMING)
    if "Transfer-Encoding" in message:  # e.g. "chunked, chunked", or a coding other than chunked
        return ParseError(message, 501)
    if "whitespace after header value" in message:  # a line starting with SP/HTAB: obs-fold
        return ParseError(message, 400, OBS_FOLD)
    return ParseError(message, 400)


_OWS = b" \t"
_VERSIONS = frozenset({"1.0", "1.1"})


class _Reader:
    """What both directions share; the callbacks are httptools' protocol."""

    _parser: httptools.HttpRequestParser | httptools.HttpResponseParser

    def __init__(self) -> None:
        self._events: deque[Event | ParseError] = deque()
        self._failed = False  # an error is queued: nothing is parsed after it
        self._in_message = False
        self._in_head = False
        self._headers: list[Header] = []
        self._head_fed = 0  # bytes fed after the one in which the head began, while it is incomplete
        self._window: list[bytes] = []  # the blocks the head came in (request line check)
        self._window_exact = False  # the head's first byte is the window's first (no message before it there)
        self._feeding = b""
        self._ended_in_feed = False  # a message ended within the block being fed
        self.upgraded = False  # llhttp stopped at the end of a head: the rest is ``trailing``
        self.trailing = bytearray()
        self.closed = False  # EOF was received

    # ---- the caller's side ----------------------------------------------------------------------

    def next_event(self) -> Event:
        """The next event, or NEED_DATA; raises ParseError when the bytes reached one."""
        if not self._events:
            return NEED_DATA
        event = self._events.popleft()
        if isinstance(event, ParseError):
            self._events.appendleft(event)  # it stays the answer, as h11's error state does
            raise event
        return event

    @property
    def in_message(self) -> bool:
        """A message has begun and its end is not yet parsed."""
        return self._in_message

    def receive_data(self, data: bytes) -> None:
        """Feed bytes; b"" means EOF."""
        if self.closed:
            return
        if self.upgraded:
            if data:
                self.trailing += data
            else:
                self.closed = True
            return
        if not data:
            self.closed = True
            if not self._failed:
                self._eof()
            return
        if self._failed:
            return
        if self._in_head:
            self._window.append(data)
            self._head_fed += len(data)
        self._feeding = data
        self._ended_in_feed = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgraded = True
            self.trailing += data[exc.args[0]:]
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self._fail(cause if isinstance(cause, ParseError) else _parse_error(exc))
        finally:
            self._feeding = b""
        if self._in_head and self._head_fed > MAX_HEAD and not self._failed:
            self._fail(ParseError("head too large", 431, HEAD_TOO_LARGE))

    def _fail(self, error: ParseError) -> None:
        self._failed = True
        self._events.append(error)

    def _eof(self) -> None:
        if self._in_message:
            self._fail(ParseError("connection closed within a message"))
        else:
            self._events.append(CLOSED)

    # ---- httptools' callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = True
        self._in_head = True
        self._headers = []
        self._head_fed = 0
        self._window = [self._feeding]
        self._window_exact = not self._ended_in_feed

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # else a trailer of a chunked body: hop-by-hop, dropped
            self._headers.append((name.lower(), value.rstrip(_OWS)))

    def on_body(self, body: bytes) -> None:
        if body:
            self._events.append(Data(body))

    def _head_done(self) -> None:
        self._in_head = False
        self._window = []


class RequestReader(_Reader):
    """The client's side of one connection: many requests, one after the other."""

    def __init__(self) -> None:
        super().__init__()
        self._url: list[bytes] = []
        self._parser = httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._url = []

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert isinstance(parser, httptools.HttpRequestParser)
        version = parser.get_http_version()
        method = parser.get_method()
        target = b"".join(self._url)
        window = b"".join(self._window)
        self._head_done()
        if version not in _VERSIONS:
            raise ParseError("unsupported HTTP version")
        # llhttp takes several spaces, and RTSP/1.0 for HTTP/1.0: h11 took only the canonical line.
        line = b"%s %s HTTP/%s\r\n" % (method, target, version.encode())
        start = window.find(line)
        # llhttp skips empty lines before a request line; h11 refused them (where we can tell:
        # behind a message in the same block, the head's first byte is not known).
        if start < 0 or (start > 0 and self._window_exact):
            raise ParseError("malformed request line")
        end = window.find(b"\r\n\r\n", start)  # llhttp refuses any CR or LF inside a line
        headers = self._headers
        size = _canonical_size(len(line), headers)
        if end >= 0:
            size = max(size, end + 4 - start)
        keep_alive = version == "1.1" and not _says_close(headers)
        self._events.append(RequestHead(method, target, headers, version.encode(), keep_alive,
                                        parser.should_upgrade(), size))

    def on_message_complete(self) -> None:
        self._in_message = False
        self._ended_in_feed = True
        self._events.append(END)


def _says_close(headers: list[Header]) -> bool:
    for name, value in headers:
        if name == b"connection" and b"close" in (token.strip().lower() for token in value.split(b",")):
            return True
    return False


def _canonical_size(line: int, headers: list[Header]) -> int:
    """The head's size written as ``name: value`` lines (what we keep of it; llhttp drops extra OWS)."""
    return line + sum(len(name) + len(value) + 4 for name, value in headers) + 2


# Statuses whose response has no body whatever its headers say (RFC 9112 section 6.3).
_NO_BODY = frozenset({204, 304})


class ResponseReader(_Reader):
    """The apiserver's answer to one request: informational responses, then one final response.

    ``head_only``: the request was HEAD, so the final response has no body. After the final
    response ended, any further byte makes the connection unusable (``reusable`` is False): it could
    only be a response to a request we did not send.
    """

    def __init__(self, head_only: bool = False) -> None:
        super().__init__()
        self._head_only = head_only
        self._reason: list[bytes] = []
        self._status = 0
        self._until_eof = False  # the final response's body ends when the connection does
        self._done = False  # the final response ended
        self._keep_alive = False
        self._extra = False
        self._parser = httptools.HttpResponseParser(self)

    @property
    def reusable(self) -> bool:
        """The final response ended, the apiserver keeps the connection, and nothing came after."""
        return self._done and self._keep_alive and not self._extra and not self._failed and not self.closed

    def on_message_begin(self) -> None:
        if self._done:
            self._extra = True
            raise ParseError("bytes after the response")
        super().on_message_begin()
        self._reason = []

    def on_status(self, reason: bytes) -> None:
        self._reason.append(reason)

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert isinstance(parser, httptools.HttpResponseParser)
        status = parser.get_status_code()
        version = parser.get_http_version()
        headers = self._headers
        if self._in_head and _canonical_size(len(b"".join(self._reason)) + 15, headers) > MAX_HEAD:
            raise ParseError("head too large", 431, HEAD_TOO_LARGE)
        self._head_done()
        if version not in _VERSIONS:
            raise ParseError("unsupported HTTP version")
        self._status = status
        keep_alive = version == "1.1" and not _says_close(headers)
        self._events.append(ResponseHead(status, b"".join(self._reason), headers, version.encode(), keep_alive))
        if status < 200:
            return
        self._keep_alive = keep_alive
        if self._head_only:
            self._final_end()
            return
        names = {name for name, _ in headers}
        framed = b"content-length" in names or _is_chunked(headers)
        self._until_eof = status not in _NO_BODY and not framed
        if self._until_eof:
            self._keep_alive = False

    def on_body(self, body: bytes) -> None:
        if self._done:
            if body:
                self._extra = True  # a HEAD response's "body": not ours to pass on
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._done:
            return
        if self._status < 200:  # 100, 102, 103: the final response follows (101: the pipe does)
            self._in_message = False
            return
        self._final_end()

    def _final_end(self) -> None:
        self._in_message = False
        self._done = True
        self._events.append(END)

    def _eof(self) -> None:
        if self._done:
            return  # the answer is complete; the connection is not reusable (``closed``)
        if self._in_message and self._until_eof and not self._in_head:
            self._final_end()
            return
        super()._eof()


def _is_chunked(headers: list[Header]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" and value.rsplit(b",", 1)[-1].strip().lower() == b"chunked":
            return True
    return False
