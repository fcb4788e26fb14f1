"""Whether a request may be served at all, from its head alone (pure: no I/O, no state).

llhttp parses strictly (http_reader.py), but a proxy must refuse more than a server: a request that
the apiserver could read differently from us is request smuggling material (RFC 9112 section
11.2), since we authenticate what we parsed and the apiserver serves what it parses. Each rule
below says why; the parser's own refusals (obs-fold, two Content-Lengths, control characters) are
mapped to the same answers by :func:`parse_failure`.
A refused request is answered with its status and closes its connection (see http_forwarder.py).

Every check runs on every request, so they are cheap: one list of header names, a token set only if a
``Connection`` header is present; the Rejections are constants.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from clusterconnect.aadproxy import headers as hdr
from clusterconnect.aadproxy import http_reader
from clusterconnect.aadproxy.http_reader import MAX_HEAD as MAX_HEAD  # re-exported: the limit is the checks' too
from clusterconnect.aadproxy.http_reader import RequestHead

# Headers that frame or route the message; a hop that drops them reads a different request.
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"host"})


class Problem(enum.Enum):
    """Why a request was refused; the value is what the log says (``error=``)."""

    MALFORMED = "MalformedRequest"
    HEAD_TOO_LARGE = "HeadTooLarge"
    UNSUPPORTED_TRANSFER_CODING = "UnsupportedTransferCoding"
    OBSOLETE_LINE_FOLDING = "ObsoleteLineFolding"
    CONFLICTING_FRAMING = "ContentLengthWithTransferEncoding"
    CONNECTION_NAMES_FRAMING = "ConnectionNamesFraming"
    TARGET_FORM = "TargetForm"
    UPGRADE_WITH_BODY = "UpgradeWithBody"


@dataclass(frozen=True, slots=True)
class Rejection:
    """Answer ``status`` with ``reason`` (one line, shown to the client) and close the connection."""

    problem: Problem
    status: int
    reason: str


MALFORMED = Rejection(Problem.MALFORMED, 400, "Bad Request: malformed HTTP request")
HEAD_TOO_LARGE = Rejection(Problem.HEAD_TOO_LARGE, 431, "Request Header Fields Too Large")
UNSUPPORTED_TRANSFER_CODING = Rejection(
    Problem.UNSUPPORTED_TRANSFER_CODING, 501, "Not Implemented: unsupported Transfer-Encoding"
)
OBSOLETE_LINE_FOLDING = Rejection(
    Problem.OBSOLETE_LINE_FOLDING, 400, "Bad Request: obsolete line folding in header"
)
CONFLICTING_FRAMING = Rejection(
    Problem.CONFLICTING_FRAMING, 400, "Bad Request: both Content-Length and Transfer-Encoding"
)
CONNECTION_NAMES_FRAMING = Rejection(
    Problem.CONNECTION_NAMES_FRAMING, 400,
    "Bad Request: Connection names Content-Length, Transfer-Encoding or Host",
)
TARGET_FORM = Rejection(Problem.TARGET_FORM, 400, "Bad Request: only origin-form request targets are served")
UPGRADE_WITH_BODY = Rejection(Problem.UPGRADE_WITH_BODY, 400, "Bad Request: upgrade request with a body")

_BY_KIND = {
    http_reader.OBS_FOLD: OBSOLETE_LINE_FOLDING,
    http_reader.CONFLICTING_FRAMING: CONFLICTING_FRAMING,
    http_reader.HEAD_TOO_LARGE: HEAD_TOO_LARGE,
}


def parse_failure(status_hint: int, kind: str | None = None) -> Rejection:
    """What to answer when the parser itself refused the head (http_reader.ParseError)."""
    if kind in _BY_KIND:
        return _BY_KIND[kind]
    if status_hint == 431:
        return HEAD_TOO_LARGE
    if status_hint == 501:
        return UNSUPPORTED_TRANSFER_CODING
    return MALFORMED


def check_request(head: RequestHead) -> Rejection | None:
    """None if the request may go on to authentication; else why not (``head`` as http_reader parsed it)."""
    # The parser bounds only a head still incomplete: a complete one arriving in one read can be larger.
    if head.size > MAX_HEAD:
        return HEAD_TOO_LARGE
    headers = head.headers
    names = [name for name, _ in headers]
    # RFC 9112 section 3.2: exactly one Host (h11 refused the others too); with two, the apiserver and
    # an audit reader could each take another one.
    if names.count(b"host") != 1:
        return MALFORMED
    if b"transfer-encoding" in names:
        # llhttp refuses both together already; RFC 9112 section 6.3 says such a message "ought to
        # be handled as an error": a hop that lets Content-Length win reads another body (the same
        # rule as headers.has_conflicting_framing).
        if b"content-length" in names:
            return CONFLICTING_FRAMING
        # Only plain "chunked", as h11: llhttp takes "gzip, chunked", whose body we would forward
        # re-chunked but still gzip-coded, without saying so: another body than the one we read.
        if names.count(b"transfer-encoding") != 1 or hdr.values(headers, b"transfer-encoding")[0].lower() != b"chunked":
            return UNSUPPORTED_TRANSFER_CODING
    elif names.count(b"content-length") > 1:  # llhttp refuses it already; h11 did unless equal
        return MALFORMED
    # Connection-named headers are dropped as hop-by-hop before forwarding (headers.py). Dropping a
    # framing header makes the forwarded request another one than the parsed one: without
    # Content-Length its body is unframed, without Host it cannot be sent (issue #11 item 7).
    if b"connection" in names and not _FRAMING.isdisjoint(hdr.connection_tokens(headers)):
        return CONNECTION_NAMES_FRAMING
    # Absolute-form and CONNECT would make the proxy choose the destination from the request;
    # ours is fixed, and the apiserver only serves origin-form.
    if head.method == b"CONNECT" or not head.target.startswith(b"/"):
        return TARGET_FORM
    # llhttp reads no body of an upgrade request (what follows the head is the new protocol); the
    # apiserver would read its Content-Length or chunks as a body: two readings of the same bytes
    # (RFC 9112 section 11.2). kubectl's exec, attach and port-forward send none.
    if head.upgrade and (b"transfer-encoding" in names or hdr.values(headers, b"content-length") not in ([], [b"0"])):
        return UPGRADE_WITH_BODY
    return None
