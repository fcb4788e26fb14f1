"""The auth proxy's request checks (aadproxy/request_checks.py): pure, no sockets."""

from __future__ import annotations

import pytest

from clusterconnect.aadproxy import request_checks as checks
from clusterconnect.aadproxy.http_reader import ParseError, RequestHead, RequestReader
from clusterconnect.aadproxy.request_checks import MAX_HEAD, Problem, check_request, parse_failure


def head_of(raw: bytes) -> tuple[bytes, RequestHead]:
    """The head as received and as the auth proxy's parser (http_reader.py) parsed it."""
    reader = RequestReader()
    reader.receive_data(raw)
    event = reader.next_event()
    assert isinstance(event, RequestHead), event
    return raw[: raw.index(b"\r\n\r\n") + 4], event


def check(raw: bytes) -> checks.Rejection | None:
    """What the forwarder answers: the parser's refusal (mapped by parse_failure), else check_request's."""
    try:
        _, request = head_of(raw)
    except ParseError as exc:
        return parse_failure(exc.status_hint, exc.kind)
    return check_request(request)


GOOD = b"GET /api/v1/pods?watch=1 HTTP/1.1\r\nhost: k\r\nauthorization: Bearer t\r\n"


@pytest.mark.parametrize("extra", [
    b"",
    b"connection: keep-alive, Upgrade\r\nupgrade: SPDY/3.1\r\n",
    b"connection: impersonate-user\r\nimpersonate-user: alice\r\n",  # removes only the client's own header
    b"transfer-encoding: chunked\r\n",
    b"content-length: 0\r\n",
    b"x-long: " + b"a" * (MAX_HEAD - 200) + b"\r\n",
])
def test_ordinary_requests_pass(extra: bytes) -> None:
    assert check(GOOD + extra + b"\r\n") is None


@pytest.mark.parametrize("raw, problem, status", [
    (GOOD + b"x-big: " + b"a" * MAX_HEAD + b"\r\n\r\n", Problem.HEAD_TOO_LARGE, 431),
    (GOOD + b"x-folded: a\r\n  b\r\n\r\n", Problem.OBSOLETE_LINE_FOLDING, 400),
    (GOOD + b"x-folded: a\r\n\tb\r\n\r\n", Problem.OBSOLETE_LINE_FOLDING, 400),
    (GOOD + b"content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n", Problem.CONFLICTING_FRAMING, 400),
    (GOOD + b"connection: Content-Length\r\ncontent-length: 2\r\n\r\n", Problem.CONNECTION_NAMES_FRAMING, 400),
    (GOOD + b"connection: keep-alive, transfer-encoding\r\ntransfer-encoding: chunked\r\n\r\n",
     Problem.CONNECTION_NAMES_FRAMING, 400),
    (GOOD + b"connection: close\r\nconnection: HOST\r\n\r\n", Problem.CONNECTION_NAMES_FRAMING, 400),
    (b"GET http://evil/api HTTP/1.1\r\nhost: k\r\n\r\n", Problem.TARGET_FORM, 400),
    (b"CONNECT /api HTTP/1.1\r\nhost: k\r\n\r\n", Problem.TARGET_FORM, 400),
    (b"OPTIONS * HTTP/1.1\r\nhost: k\r\n\r\n", Problem.TARGET_FORM, 400),
])
def test_refused(raw: bytes, problem: Problem, status: int) -> None:
    rejection = check(raw)
    assert rejection is not None and rejection.problem is problem and rejection.status == status
    assert "\n" not in rejection.reason and rejection.reason


def test_head_size_counts_the_head_only() -> None:
    # h11 limits only incomplete heads; a complete one larger than MAX_HEAD must still be refused,
    # and one just within it must not be.
    line = b"x-pad: " + b"a" * 1000 + b"\r\n"
    base = len(GOOD) + 2
    fits = GOOD + line * ((MAX_HEAD - base) // len(line)) + b"\r\n"
    assert len(head_of(fits)[0]) <= MAX_HEAD and check(fits) is None
    over = GOOD + line * ((MAX_HEAD - base) // len(line) + 1) + b"\r\n"
    assert len(head_of(over)[0]) > MAX_HEAD
    assert check(over) is checks.HEAD_TOO_LARGE


@pytest.mark.parametrize("hint, expected", [
    (400, checks.MALFORMED), (431, checks.HEAD_TOO_LARGE), (501, checks.UNSUPPORTED_TRANSFER_CODING),
])
def test_parse_failure(hint: int, expected: checks.Rejection) -> None:
    assert parse_failure(hint) is expected
    assert parse_failure(hint).status == hint
