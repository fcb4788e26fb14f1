"""The auth proxy's HTTP/1.1 parser and writer (aadproxy/http_reader.py, http_writer.py): pure, no sockets."""

from __future__ import annotations

import h11
import pytest

from clusterconnect.aadproxy import http_writer as wr
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
from clusterconnect.aadproxy.request_checks import Problem, check_request, parse_failure

GET = b"GET /api/v1/pods?watch=1 HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer t\r\n\r\n"


def events(reader: RequestReader | ResponseReader) -> list:
    """Every event queued so far (up to NEED_DATA); a ParseError is the last item if one was reached."""
    out: list = []
    while True:
        try:
            event = reader.next_event()
        except ParseError as exc:
            out.append(exc)
            return out
        if event is NEED_DATA:
            return out
        out.append(event)


def parsed(*blocks: bytes) -> list:
    reader = RequestReader()
    for block in blocks:
        reader.receive_data(block)
    return events(reader)


def refusal(raw: bytes) -> tuple[Problem, int]:
    """What the forwarder answers to a request head: the parser's refusal or check_request's."""
    got = parsed(raw)
    if isinstance(got[-1], ParseError) and not any(isinstance(e, RequestHead) for e in got):
        rejection = parse_failure(got[-1].status_hint, got[-1].kind)
    else:
        head = got[0]
        assert isinstance(head, RequestHead), got
        rejection = check_request(head)
        assert rejection is not None, f"{raw!r} was accepted"
    return rejection.problem, rejection.status


# ---- requests -----------------------------------------------------------------------------------


def test_a_request_head_then_its_end() -> None:
    head, end = parsed(GET)
    assert isinstance(head, RequestHead) and end is END
    assert (head.method, head.target, head.http_version) == (b"GET", b"/api/v1/pods?watch=1", b"1.1")
    assert head.headers == [(b"host", b"k"), (b"authorization", b"Bearer t")]  # names lowercase
    assert head.keep_alive and not head.upgrade and head.size == len(GET)
    assert check_request(head) is None


def test_the_same_request_byte_by_byte() -> None:
    reader = RequestReader()
    for i in range(len(GET)):
        assert reader.next_event() is NEED_DATA
        reader.receive_data(GET[i:i + 1])
    got = events(reader)
    assert isinstance(got[0], RequestHead) and got[0].size == len(GET) and got[1:] == [END]


def test_values_lose_surrounding_whitespace_and_trailers_are_dropped() -> None:
    raw = (b"POST /x HTTP/1.1\r\nHost: k\r\nX-A:   a b  \t\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n")
    head, data, end = parsed(raw)
    assert (b"x-a", b"a b") in head.headers and all(name != b"x-trailer" for name, _ in head.headers)
    assert data == Data(b"hello") and end is END


def test_pipelined_requests_come_out_in_order() -> None:
    post = b"POST /b HTTP/1.1\r\nhost: k\r\ncontent-length: 3\r\n\r\nabc"
    got = parsed(GET + post + GET[:10])
    assert [type(e).__name__ if not isinstance(e, type(END)) else repr(e) for e in got] == [
        "RequestHead", "END", "RequestHead", "Data", "END"]
    assert got[2].target == b"/b" and got[3].data == b"abc"


def test_eof_between_requests_is_closed_and_within_one_an_error() -> None:
    assert parsed(GET, b"")[-1] is CLOSED
    assert parsed(b"")[-1] is CLOSED
    assert isinstance(parsed(GET[:20], b"")[-1], ParseError)
    cut = parsed(b"POST /x HTTP/1.1\r\nhost: k\r\ncontent-length: 5\r\n\r\nab", b"")
    assert cut[1] == Data(b"ab") and isinstance(cut[-1], ParseError)


def test_an_error_comes_after_what_was_parsed_before_it_and_stays() -> None:
    reader = RequestReader()
    reader.receive_data(b"GET / HTTP/1.1\r\nhost: k\r\nconnection: close\r\n\r\nGET / HTTP/1.1\r\n")
    head = reader.next_event()
    assert isinstance(head, RequestHead) and not head.keep_alive
    assert reader.next_event() is END
    for _ in range(2):
        with pytest.raises(ParseError):
            reader.next_event()


def test_an_empty_line_before_a_request_line_is_refused_where_its_start_is_known() -> None:
    assert isinstance(parsed(GET, b"\r\n" + GET)[-1], ParseError)  # a new block starts the next head
    assert isinstance(parsed(GET + b"\r\n" + GET)[2], RequestHead)  # behind a message in one block: not known


def test_http_1_0_is_not_kept_alive() -> None:
    head = parsed(b"GET / HTTP/1.0\r\nhost: k\r\nconnection: keep-alive\r\n\r\n")[0]
    assert head.http_version == b"1.0" and not head.keep_alive


def test_an_upgrade_stops_at_the_head_and_keeps_the_rest() -> None:
    raw = b"GET /exec HTTP/1.1\r\nhost: k\r\nconnection: Upgrade\r\nupgrade: SPDY/3.1\r\n\r\n"
    reader = RequestReader()
    reader.receive_data(raw + b"\x00\x01raw GET / HTTP/1.1\r\n")
    head, end = events(reader)
    assert head.upgrade and end is END
    reader.receive_data(b"more")
    reader.receive_data(b"")
    assert bytes(reader.trailing) == b"\x00\x01raw GET / HTTP/1.1\r\nmore" and reader.closed
    assert events(reader) == []
    # An Upgrade header alone is no upgrade for llhttp: the rest is parsed as HTTP.
    got = parsed(b"GET / HTTP/1.1\r\nhost: k\r\nupgrade: websocket\r\n\r\n" + GET)
    assert not got[0].upgrade and isinstance(got[2], RequestHead)


@pytest.mark.parametrize("raw, problem, status", [
    # llhttp refuses these itself; each gets the answer h11 gave.
    (b"GET / HTTP/1.1\r\nhost: k\r\nx: a\r\n  b\r\n\r\n", Problem.OBSOLETE_LINE_FOLDING, 400),
    (b"GET / HTTP/1.1\r\nhost: k\r\nx: a\r\n\tb\r\n\r\n", Problem.OBSOLETE_LINE_FOLDING, 400),
    (b"POST / HTTP/1.1\r\nhost: k\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
     Problem.CONFLICTING_FRAMING, 400),
    (b"POST / HTTP/1.1\r\nhost: k\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello", Problem.MALFORMED, 400),
    (b"POST / HTTP/1.1\r\nhost: k\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello", Problem.MALFORMED, 400),
    (b"POST / HTTP/1.1\r\nhost: k\r\ncontent-length: 5, 5\r\n\r\nhello", Problem.MALFORMED, 400),
    (b"POST / HTTP/1.1\r\nhost: k\r\ncontent-length: +5\r\n\r\nhello", Problem.MALFORMED, 400),
    (b"POST / HTTP/1.1\r\nhost: k\r\ntransfer-encoding: chunked, chunked\r\n\r\n",
     Problem.UNSUPPORTED_TRANSFER_CODING, 501),
    (b"POST / HTTP/1.1\r\nhost: k\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
     Problem.UNSUPPORTED_TRANSFER_CODING, 501),
    (b"GET / HTTP/1.1\r\nhost: k\r\nx: a\x01b\r\n\r\n", Problem.MALFORMED, 400),
    (b"GET / HTTP/1.1\r\nhost: k\r\nx: a\x00b\r\n\r\n", Problem.MALFORMED, 400),
    (b"GET / HTTP/1.1\r\nhost: k\r\nx: a\x7fb\r\n\r\n", Problem.MALFORMED, 400),
    (b"GET / HTTP/1.1\r\nhost: k\r\nbad name: x\r\n\r\n", Problem.MALFORMED, 400),
    (b"GET /a\x01b HTTP/1.1\r\nhost: k\r\n\r\n", Problem.MALFORMED, 400),
    (b"GET / HTTP/1.1\nhost: k\n\n", Problem.MALFORMED, 400),
    (b"GET / HTTP/1.1\r\nhost: k\nx: y\r\n\r\n", Problem.MALFORMED, 400),
    (b"NOT HTTP AT ALL\r\n\r\n", Problem.MALFORMED, 400),
    (b"GET / HTTP/1.2\r\nhost: k\r\n\r\n", Problem.MALFORMED, 400),
    # llhttp takes these; we refuse them, as h11 did.
    (b"GET  / HTTP/1.1\r\nhost: k\r\n\r\n", Problem.MALFORMED, 400),
    (b"GET / RTSP/1.0\r\nhost: k\r\n\r\n", Problem.MALFORMED, 400),
    (b"GET / HTTP/2.0\r\nhost: k\r\n\r\n", Problem.MALFORMED, 400),
    (b"\r\nGET / HTTP/1.1\r\nhost: k\r\n\r\n", Problem.MALFORMED, 400),
    (b"GET / HTTP/1.1\r\n\r\n", Problem.MALFORMED, 400),
    (b"GET / HTTP/1.0\r\n\r\n", Problem.MALFORMED, 400),
    (b"GET / HTTP/1.1\r\nhost: k\r\nhost: j\r\n\r\n", Problem.MALFORMED, 400),
    (b"POST / HTTP/1.1\r\nhost: k\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
     Problem.UNSUPPORTED_TRANSFER_CODING, 501),
    (b"POST / HTTP/1.1\r\nhost: k\r\ntransfer-encoding: gzip\r\n\r\n", Problem.UNSUPPORTED_TRANSFER_CODING, 501),
    # llhttp reads no body of an upgrade request; the apiserver would.
    (b"POST /x HTTP/1.1\r\nhost: k\r\nconnection: upgrade\r\nupgrade: SPDY/3.1\r\ncontent-length: 5\r\n\r\nhello",
     Problem.UPGRADE_WITH_BODY, 400),
    (b"POST /x HTTP/1.1\r\nhost: k\r\nconnection: upgrade\r\nupgrade: SPDY/3.1\r\ntransfer-encoding: chunked\r\n\r\n",
     Problem.UPGRADE_WITH_BODY, 400),
    (b"CONNECT k:443 HTTP/1.1\r\nhost: k\r\n\r\n", Problem.TARGET_FORM, 400),
])
def test_refused(raw: bytes, problem: Problem, status: int) -> None:
    assert refusal(raw) == (problem, status)


@pytest.mark.parametrize("body", [b"zz\r\n", b"5 \r\nhello\r\n", b"5\nhello\r\n", b"5\r\nhelloXX"])
def test_a_malformed_chunked_body_is_an_error_after_the_head(body: bytes) -> None:
    got = parsed(b"POST / HTTP/1.1\r\nhost: k\r\ntransfer-encoding: chunked\r\n\r\n" + body)
    assert isinstance(got[0], RequestHead) and check_request(got[0]) is None
    assert isinstance(got[-1], ParseError)


def test_an_upgrade_with_an_empty_body_is_served() -> None:
    head = parsed(b"POST /x HTTP/1.1\r\nhost: k\r\nconnection: upgrade\r\nupgrade: SPDY/3.1\r\n"
                  b"content-length: 0\r\n\r\n")[0]
    assert head.upgrade and check_request(head) is None


def test_an_incomplete_head_is_refused_once_too_large() -> None:
    reader = RequestReader()
    reader.receive_data(b"GET / HTTP/1.1\r\nhost: k\r\nx-big: ")
    while True:
        reader.receive_data(b"a" * 4096)
        got = events(reader)
        if got:
            break
    error = got[-1]
    assert isinstance(error, ParseError) and error.status_hint == 431
    assert parse_failure(error.status_hint, error.kind).problem is Problem.HEAD_TOO_LARGE


def test_a_complete_head_reports_its_size_however_it_arrived() -> None:
    raw = b"GET / HTTP/1.1\r\nhost: k\r\nx-pad: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    for blocks in ([raw], [raw[:100], raw[100:]]):
        head = parsed(*blocks)[0]
        assert isinstance(head, RequestHead) and head.size == len(raw)
    pipelined = parsed(GET + raw)
    assert pipelined[2].size >= len(raw)


# ---- responses ----------------------------------------------------------------------------------


def response(raw: bytes, head_only: bool = False, eof: bool = False) -> tuple[list, ResponseReader]:
    reader = ResponseReader(head_only=head_only)
    reader.receive_data(raw)
    if eof:
        reader.receive_data(b"")
    return events(reader), reader


def test_a_response_with_a_length() -> None:
    got, reader = response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nAudit-Id: 1\r\n\r\nok")
    head = got[0]
    assert isinstance(head, ResponseHead) and (head.status, head.reason) == (200, b"OK")
    assert head.headers == [(b"content-length", b"2"), (b"audit-id", b"1")]
    assert got[1:] == [Data(b"ok"), END] and reader.reusable


def test_a_chunked_response_streams_each_chunk() -> None:
    reader = ResponseReader()
    reader.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nADDED\r\n")
    assert events(reader)[1:] == [Data(b"ADDED")]
    reader.receive_data(b"8\r\nMODIFIED\r\n0\r\n\r\n")
    assert events(reader) == [Data(b"MODIFIED"), END] and reader.reusable


def test_a_response_until_eof_ends_with_the_connection() -> None:
    got, reader = response(b"HTTP/1.1 200 OK\r\n\r\nall of it", eof=True)
    assert got[1:] == [Data(b"all of it"), END] and not reader.reusable


def test_a_head_response_has_no_body_and_anything_after_it_spoils_the_connection() -> None:
    got, reader = response(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", head_only=True)
    assert got[1:] == [END] and reader.reusable
    _, reader = response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", head_only=True)
    assert not reader.reusable


def test_informational_responses_then_the_final_one() -> None:
    got, reader = response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    assert [e.status for e in got if isinstance(e, ResponseHead)] == [100, 204] and got[-1] is END
    assert reader.reusable


def test_101_stops_at_its_head() -> None:
    got, reader = response(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: SPDY/3.1\r\nConnection: Upgrade\r\n\r\n"
                           b"hello-from-server")
    assert got[0].status == 101 and reader.upgraded and bytes(reader.trailing) == b"hello-from-server"


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nx: a\r\n b\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"NOT HTTP\r\n\r\n",
])
def test_malformed_responses(raw: bytes) -> None:
    got, _ = response(raw)
    assert isinstance(got[-1], ParseError)


def test_a_response_cut_short_is_an_error_and_one_never_begun_is_closed() -> None:
    got, _ = response(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-part", eof=True)
    assert got[1] == Data(b"only-part") and isinstance(got[-1], ParseError)
    got, _ = response(b"", eof=True)
    assert got == [CLOSED]


def test_bytes_after_the_response_spoil_the_connection() -> None:
    _, reader = response(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert not reader.reusable
    _, reader = response(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert not reader.reusable


# ---- writing ------------------------------------------------------------------------------------


def h11_server_reads(data: bytes) -> list:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    out = []
    while (event := conn.next_event()) is not h11.NEED_DATA:
        out.append(event)
        if isinstance(event, h11.EndOfMessage):
            break
    return out


def test_a_request_head_and_chunked_body_are_valid_http() -> None:
    data = (wr.request_head(b"PUT", b"/x?y=1", [(b"host", b"k"), (b"transfer-encoding", b"chunked")])
            + wr.chunk(b"part1") + wr.chunk(b"") + wr.chunk(b"part2") + wr.LAST_CHUNK)
    request, *body, end = h11_server_reads(data)
    assert request.method == b"PUT" and request.target == b"/x?y=1"
    assert b"".join(event.data for event in body) == b"part1part2" and isinstance(end, h11.EndOfMessage)


@pytest.mark.parametrize("headers", [
    [(b"host", b"k"), (b"impersonate-user", b"alice\r\nimpersonate-group: system:masters")],
    [(b"host", b"k"), (b"impersonate-user", b"a\nb")],
    [(b"host", b"k"), (b"impersonate-user", b"a\x00")],
    [(b"host", b"k"), (b"impersonate-user", b" alice")],
    [(b"host", b"k"), (b"bad name", b"x")],
    [(b"host", b"k"), (b"", b"x")],
    [(b"impersonate-user", b"alice")],  # no Host
])
def test_a_request_head_that_would_be_header_injection_is_not_written(headers: list) -> None:
    with pytest.raises(wr.WriteError) as raised:
        wr.request_head(b"GET", b"/", headers)
    assert b"alice" not in str(raised.value).encode()


def test_non_ascii_claims_are_written_as_they_are() -> None:
    head = wr.request_head(b"GET", b"/", [(b"host", b"k"), (b"impersonate-user", "jürgen".encode())])
    assert h11_server_reads(head)[0].headers[1] == (b"impersonate-user", "jürgen".encode())


def test_our_own_answer() -> None:
    data = wr.complete_response(401, [(b"content-type", b"application/json"), (b"connection", b"close")], b"{}")
    got, reader = response(data, eof=True)
    assert got[0].status == 401 and got[0].reason == b"Unauthorized" and not got[0].keep_alive
    assert got[1:] == [Data(b"{}"), END]
    assert wr.reason_phrase(599) == b""
