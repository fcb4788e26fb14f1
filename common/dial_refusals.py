"""What kubectl sees when the tunnel cannot be opened: an HTTP response with a Kubernetes Status body.

Shared by the two services that Dial for kubectl, the client proxy and the gateway: both wait for
the relay's "open" (``wait_open``) and, if the relay refused or could not open the path, write this
one response on a connection they are about to close (``refuse``).

The relay says why it refused a Dial in the trailing metadata ``clusterconnect-reason`` (a
``DialRefusal``), and its message is shown as it is. Without a reason, the failure came from gRPC
itself (the relay is unreachable, or its certificate is not trusted): then only gRPC's own text
tells the cases apart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import h11

from clusterconnect import metadata as md
from clusterconnect.kstatus import status_body
from clusterconnect.logs import get_logger
from clusterconnect.metadata import DialRefusal
from clusterconnect.streams import ByteStream, PeerGone

log = get_logger(__name__)

# After an error response, how long the client may take to read it and hang up.
LINGER = 1.0
# How long a Dial may take to open. With the relay connected, the relay itself answers within its
# Accept timeout (a burst of new connections may keep the agent busy for a while); without a
# connection to the relay, a relay that does not answer must become an error quickly.
DIAL_TIMEOUT_CONNECTED = 6.0
DIAL_TIMEOUT = 1.8

# gRPC status -> (HTTP status, Kubernetes StatusReason), for failures without a relay's reason.
_MAPPING: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.NOT_FOUND: (404, "NotFound"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "Unauthorized"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "Forbidden"),
    grpc.StatusCode.INVALID_ARGUMENT: (400, "BadRequest"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "Timeout"),
    grpc.StatusCode.UNAVAILABLE: (502, "ServiceUnavailable"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "TooManyRequests"),
}

# The relay's reason -> (HTTP status, Kubernetes StatusReason) kubectl shows.
_REFUSALS: dict[DialRefusal, tuple[int, str]] = {
    DialRefusal.MISSING_CLUSTER: (400, "BadRequest"),
    DialRefusal.MISSING_TOKEN: (401, "Unauthorized"),
    DialRefusal.CLUSTER_NOT_REGISTERED: (404, "NotFound"),  # sent by older relays only
    DialRefusal.TOKEN_REFUSED: (401, "Unauthorized"),
    DialRefusal.ACCESS_DENIED: (403, "Forbidden"),
    DialRefusal.AGENT_NOT_CONNECTED: (502, "ServiceUnavailable"),
    DialRefusal.AGENT_OVERLOADED: (502, "ServiceUnavailable"),
    DialRefusal.AGENT_NOT_ANSWERING: (502, "ServiceUnavailable"),
    DialRefusal.CONNECTION_LOST: (502, "ServiceUnavailable"),
    DialRefusal.TOO_MANY_CONNECTIONS: (429, "TooManyRequests"),
    DialRefusal.ACCESS_REVOKED: (403, "Forbidden"),
}


def dial_refusal(trailing_metadata: Iterable[tuple[str, str | bytes]] | None) -> DialRefusal | None:
    """The relay's reason in a Dial's trailing metadata; None if there is none (or one we do not know)."""
    for key, value in trailing_metadata or ():
        if key == md.REASON:
            try:
                return DialRefusal(value.decode() if isinstance(value, bytes) else value)
            except ValueError:  # a newer relay's reason: the status code still tells the kind
                return None
    return None


def is_discovery_request(head: bytes) -> bool:
    """Whether the request line (if it arrived) asks for API discovery (GET /api or /apis).

    kubectl reads discovery answers with ``Raw()``, which never decodes a Status body: for a JSON
    body it shows "unknown". A text/plain body is shown as the message, so discovery gets that.
    """
    line = head.split(b"\r\n", 1)[0].split(b" ")
    return len(line) == 3 and line[0] == b"GET" and line[1].split(b"?", 1)[0] in (b"/api", b"/apis")


def _status(grpc_code: grpc.StatusCode | None, reason: DialRefusal | None) -> tuple[int, str]:
    if reason is not None:
        return _REFUSALS[reason]
    if grpc_code is None:
        return 502, "ServiceUnavailable"
    return _MAPPING.get(grpc_code, (502, "InternalError"))


def error_response(grpc_code: grpc.StatusCode | None, message: str, plain: bool = False,
                   reason: DialRefusal | None = None) -> bytes:
    """A complete HTTP/1.1 response (head and body) that closes the connection.

    Its status follows the relay's ``reason`` if there is one, else ``grpc_code``. The body is a
    Kubernetes Status, or with ``plain`` just the message as text/plain.
    """
    code, k8s_reason = _status(grpc_code, reason)
    body = message.encode() + b"\n" if plain else status_body(code, message, k8s_reason)
    conn = h11.Connection(h11.SERVER)
    # h11 needs to have seen a request before it writes a response; give it a minimal one.
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: clusterconnect\r\n\r\n")
    conn.next_event()
    head = conn.send(
        h11.Response(
            status_code=code,
            headers=[
                ("Content-Type", "text/plain; charset=utf-8" if plain else "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
                ("X-Clusterconnect-Error", "1"),
            ],
        )
    )
    return head + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())


def describe_rpc_error(code: grpc.StatusCode, details: str, relay: str, reason: DialRefusal | None = None) -> str:
    """One line: the relay's own message when it gave a reason, else what went wrong reaching it."""
    text = details or code.name
    if reason is not None or code != grpc.StatusCode.UNAVAILABLE:
        return text
    # gRPC's own text is all there is here (e.g. "failed to connect to all addresses", "ssl handshake").
    lowered = text.lower()
    if "ssl" in lowered or "handshake" in lowered or "certificate" in lowered:
        return f"cannot reach relay {relay}: TLS verification failed (wrong --relay-ca?)"
    if "connect" in lowered or "dns" in lowered or "unreachable" in lowered or "socket" in lowered:
        return f"cannot reach relay {relay}: {text}"
    return text


@dataclass(frozen=True)
class Refused:
    """Why a Dial did not open: the status (None: no status, e.g. a local check), a one-line message
    and the relay's reason, if it gave one."""

    code: grpc.StatusCode | None
    message: str
    reason: DialRefusal | None = None

    @property
    def transport_failure(self) -> bool:
        """The Dial failed below the relay's own answers (no clusterconnect-reason): its connection closed
        or went away (GOAWAY of a stopping relay) before the relay took the call up, so nothing was sent.
        CANCELLED too: a stopping relay's grpc core cancels the calls that reached it after its shutdown
        began and before the handler took them (two of 538 Dials in a rolling restart, 2026-12-03)."""
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) and self.reason is None


async def wait_open(call: grpc.aio.StreamStreamCall[Any, Any], timeout: float, relay: str) -> Refused | None:
    """None once the relay says the path is open (initial metadata ``x-clusterconnect-open``), else why not.

    Nothing may be written before: a write racing the relay's refusal turns grpc's status into
    INTERNAL, and the user would not learn why."""
    try:
        initial = await asyncio.wait_for(call.initial_metadata(), timeout)
    except TimeoutError:
        return Refused(grpc.StatusCode.DEADLINE_EXCEEDED, f"relay {relay} did not answer within {timeout:g}s")
    if any(key == md.OPEN for key, _ in initial or ()):
        return None
    code = await call.code()
    reason = dial_refusal(await call.trailing_metadata())
    return Refused(code, describe_rpc_error(code, await call.details() or "", relay, reason), reason)


async def refuse(downstream: ByteStream, refused: Refused, head: bytes) -> None:
    """Answer ``refused`` as one HTTP response, shaped for the request whose start is ``head``, and
    let the client read it and hang up first, so that it sees the response rather than a reset."""
    log.info("connection refused", reason=refused.message)
    try:
        await downstream.send(error_response(refused.code, refused.message, plain=is_discovery_request(head),
                                             reason=refused.reason))
        async with asyncio.timeout(LINGER):
            while await downstream.receive():
                pass
    except (PeerGone, TimeoutError):
        pass
