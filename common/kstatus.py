"""Kubernetes ``Status`` bodies for errors answered by the auth or client proxy (kubectl prints ``message``)."""

from __future__ import annotations

import json

REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    405: "MethodNotAllowed",
    431: "BadRequest",
    501: "BadRequest",
    502: "ServiceUnavailable",
    503: "ServiceUnavailable",
}


def status_body(code: int, message: str, reason: str | None = None) -> bytes:
    """``{"kind":"Status",...}`` as kube-apiserver writes it; ``reason`` defaults from the code."""
    return json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason or REASONS.get(code, "InternalError"),
            "code": code,
        },
        separators=(",", ":"),
    ).encode()
