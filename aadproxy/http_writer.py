"""HTTP/1.1 messages written as bytes (pure: no I/O, no state).

Heads are built from a header list; a body keeps its framing where the proxy keeps the headers
that frame it (a Content-Length body passes unchanged), and is re-chunked where the incoming
chunking was a hop-by-hop detail (Transfer-Encoding is dropped and set again, as for any header
of one connection: headers.py).

A request head is checked before it is written: its headers include what the authenticator made
from token claims (impersonation), and a value with CR or LF would be header injection (as h11's
``LocalProtocolError``, the request is refused: :class:`WriteError`). A response head carries
only what llhttp parsed (already valid) and our own constants.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus

from clusterconnect.aadproxy.headers import Header

# RFC 9110 section 5.1 (field-name is a token) and 5.5 (field-value: visible characters and
# obs-text, inner SP/HTAB), as h11 checks what it sends.
_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?")
_TARGET = re.compile(rb"[\x21-\x7e]+")

LAST_CHUNK = b"0\r\n\r\n"  # no trailers: they are hop-by-hop


class WriteError(ValueError):
    """A message that cannot be written as valid HTTP/1.1 (never quotes the offending value)."""


def request_head(method: bytes, target: bytes, headers: Iterable[Header]) -> bytes:
    """``METHOD target HTTP/1.1`` and the headers, every one checked."""
    if not _NAME.fullmatch(method) or not _TARGET.fullmatch(target):
        raise WriteError("invalid request line")
    lines = [b"%s %s HTTP/1.1\r\n" % (method, target)]
    for name, value in headers:
        if not _NAME.fullmatch(name) or not _VALUE.fullmatch(value):
            raise WriteError("invalid header")
        lines.append(b"%s: %s\r\n" % (name, value))
    if len(lines) == 1 or not any(name == b"host" for name, _ in headers):
        raise WriteError("no Host header")
    lines.append(b"\r\n")
    return b"".join(lines)


def response_head(status: int, reason: bytes, headers: Iterable[Header]) -> bytes:
    """``HTTP/1.1 status reason`` and the headers (parsed ones or our own: not checked again)."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    lines += [b"%s: %s\r\n" % (name, value) for name, value in headers]
    lines.append(b"\r\n")
    return b"".join(lines)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never empty: an empty chunk is the last one)."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def complete_response(status: int, headers: list[Header], body: bytes) -> bytes:
    """A whole response with a Content-Length body (our own answers)."""
    return response_head(status, reason_phrase(status),
                         [*headers, (b"content-length", str(len(body)).encode())]) + body
