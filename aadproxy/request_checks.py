"""Whether a request may be served at all, from its head alone (pure: no I/O, no state).

h11 parses strictly, but a proxy must refuse more than a server: a request that the apiserver could
read differently from us is request smuggling material (RFC 9112 section 11.2), since we
authenticate what we parsed and the apiserver serves what it parses. Each rule below says why.
A refused request is answered with its status and closes its connection (see http_forwarder.py).

Every check runs on every request, so they are cheap: one set of header names, a token set only if a
``Connection`` header is present; the Rejections are constants.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

from clusterconnect.aadproxy import headers as hdr

# Largest request or response head (and chunk-size line) we buffer.
MAX_HEAD = 64 * 1024

# A header line starting with space or tab continues the previous one (RFC 9112 obs-fold).
_OBS_FOLD = re.compile(rb"\n[ \t]")

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


def parse_failure(status_hint: int) -> Rejection:
    """What to answer when h11 itself refused the head (its ``error_status_hint``)."""
    if status_hint == 431:
        return HEAD_TOO_LARGE
    if status_hint == 501:
        return UNSUPPORTED_TRANSFER_CODING
    return MALFORMED


def check_request(
    head: bytes | bytearray, method: bytes, target: bytes, headers: Sequence[hdr.Header]
) -> Rejection | None:
    """None if the request may go on to authentication; else why not.

    ``head`` is the request head as received (request line and header lines), ``headers`` as h11
    parsed them (names lowercase).
    """
    # h11 bounds only a head still incomplete: a complete one arriving in one read can be larger.
    if len(head) > MAX_HEAD:
        return HEAD_TOO_LARGE
    # h11 unfolds obs-fold silently; a next hop that does not would see other headers (RFC 9112
    # section 5.2 lets a proxy refuse it, and we do).
    if _OBS_FOLD.search(head):
        return OBSOLETE_LINE_FOLDING
    names = {name for name, _ in headers}
    # h11 accepts both together (Transfer-Encoding wins); a hop that lets Content-Length win reads
    # another body, and RFC 9112 section 6.3 says such a message "ought to be handled as an error"
    # (the same rule as headers.has_conflicting_framing, on the names already collected).
    if b"content-length" in names and b"transfer-encoding" in names:
        return CONFLICTING_FRAMING
    # Connection-named headers are dropped as hop-by-hop before forwarding (headers.py). Dropping a
    # framing header makes the forwarded request another one than the parsed one: without
    # Content-Length its body is unframed, without Host it cannot be sent (issue #11 item 7).
    if b"connection" in names and not _FRAMING.isdisjoint(hdr.connection_tokens(headers)):
        return CONNECTION_NAMES_FRAMING
    # Absolute-form and CONNECT would make the proxy choose the destination from the request;
    # ours is fixed, and the apiserver only serves origin-form.
    if method == b"CONNECT" or not target.startswith(b"/"):
        return TARGET_FORM
    return None
