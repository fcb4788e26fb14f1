"""What kubectl sees when the tunnel cannot be opened: an HTTP response with a Kubernetes Status body.

The client proxy never parses HTTP; it only writes this one response, on a connection it is about
to close, when the relay refused or could not open the path.
"""

from __future__ import annotations

import grpc
import h11

from clusterconnect.kstatus import status_body

# gRPC status -> (HTTP status, Kubernetes StatusReason)
_MAPPING: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.NOT_FOUND: (404, "NotFound"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "Unauthorized"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "Forbidden"),
    grpc.StatusCode.INVALID_ARGUMENT: (400, "BadRequest"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "Timeout"),
    grpc.StatusCode.UNAVAILABLE: (502, "ServiceUnavailable"),
}


def is_discovery_request(head: bytes) -> bool:
    """Whether the request line (if it arrived) asks for API discovery (GET /api or /apis).

    kubectl reads discovery answers with ``Raw()``, which never decodes a Status body: for a JSON
    body it shows "unknown". A text/plain body is shown as the message, so discovery gets that.
    """
    line = head.split(b"\r\n", 1)[0].split(b" ")
    return len(line) == 3 and line[0] == b"GET" and line[1].split(b"?", 1)[0] in (b"/api", b"/apis")


def error_response(grpc_code: grpc.StatusCode | None, message: str, plain: bool = False) -> bytes:
    """A complete HTTP/1.1 response (head and body) that closes the connection.

    The body is a Kubernetes Status, or with ``plain`` just the message as text/plain.
    """
    code, reason = _MAPPING.get(grpc_code, (502, "InternalError")) if grpc_code else (502, "ServiceUnavailable")
    body = message.encode() + b"\n" if plain else status_body(code, message, reason)
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


def describe_rpc_error(code: grpc.StatusCode, details: str, relay: str) -> str:
    """One line for a failure to reach the relay itself, or the relay's own message."""
    text = details or code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        lowered = text.lower()
        if "ssl" in lowered or "handshake" in lowered or "certificate" in lowered:
            return f"cannot reach relay {relay}: TLS verification failed (wrong --relay-ca?)"
        if "connect" in lowered or "dns" in lowered or "unreachable" in lowered or "socket" in lowered:
            return f"cannot reach relay {relay}: {text}"
    return text
