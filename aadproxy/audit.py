"""The auth proxy's audit log (``--audit-log FILE|-``): one JSON line per request, an audit.k8s.io/v1 Event.

The shape is kube-apiserver's at level Metadata, stage ResponseComplete, so the tools that read the
apiserver's audit log read this one too. ``user`` is the caller as this proxy authenticated it (OIDC
mode; ``{}`` when the apiserver authenticates the request itself: token passthrough, ServiceAccount
tokens, or a token that did not verify) and ``impersonatedUser`` whom the proxy's own credential
impersonates for it. The apiserver's own audit log names the proxy's ServiceAccount as the user and the
caller as impersonatedUser; this one says who was behind it, including for requests refused here, which
never reach the apiserver. ``responseStatus.code`` 0: the connection broke before any answer.

Never in it: a header value (so no token or Authorization), a request or response body. The query is
kept (``requestURI``, as the apiserver keeps it) except the values of parameters whose name looks like a
credential. The builder is pure (:func:`audit_event`); :class:`AuditLog` writes the lines, and a write
that fails is logged once and never fails the request.
"""

from __future__ import annotations

import json
import os
import re
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

from prometheus_client import Counter

from clusterconnect import metrics
from clusterconnect.aadproxy.authn import Subject
from clusterconnect.aadproxy.request_info import request_info
from clusterconnect.errors import StartupError
from clusterconnect.logs import get_logger

log = get_logger(__name__)

ANNOTATION = "clusterconnect.io/"
_SECRET_PARAM = re.compile(r"(authorization|token|cookie|credential|secret|password)", re.IGNORECASE)

WRITE_FAILURES = Counter("clusterconnect_aadproxy_audit_write_failures_total",
                         "Audit events that could not be written to --audit-log", registry=metrics.REGISTRY)


@dataclass(frozen=True)
class RequestRecord:
    """What one request was, who sent it and how it ended: the audit event's facts."""

    method: str
    target: str  # path and query, as in the request line
    code: int  # the status the client got; 0 if none
    received: float  # wall clock (time.time()) when the request head was read
    completed: float  # wall clock when the answer ended
    user: Subject | None = None
    impersonated: Subject | None = None
    authentication: str = "passthrough"  # oidc | passthrough | rejected | none (gone before a decision)
    reason: str | None = None  # why it was refused (the metrics' authentication failure reason)


@dataclass(frozen=True)
class ConnectionFacts:
    """What is the same for every request of one tunnelled connection."""

    cluster: str = ""
    trace_id: str | None = None
    source_ips: tuple[str, ...] = ()


def peer_ip(peer: str) -> str | None:
    """The IP of a gRPC peer string (``ipv4:10.0.0.7:51234``, ``ipv6:[::1]:5``); None for others (unix:)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or None
    if kind == "ipv6":
        host = rest.rpartition(":")[0] if rest.startswith("[") else rest
        return host.strip("[]") or None
    return None


def rfc3339_micro(timestamp: float) -> str:
    """``2026-12-03T07:37:34.123456Z``, as the apiserver writes its audit timestamps."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def safe_request_uri(target: str) -> str:
    """``target`` with the values of credential-looking query parameters replaced by ``[redacted]``."""
    path, sep, query = target.partition("?")
    if not sep:
        return path
    kept = []
    for item in query.split("&"):
        key, eq, _ = item.partition("=")
        if eq and _SECRET_PARAM.search(unquote(key)):
            item = f"{key}={quote('[redacted]')}"
        kept.append(item)
    return f"{path}?{'&'.join(kept)}"


def _user(subject: Subject | None) -> dict[str, Any]:
    if subject is None:
        return {}
    user: dict[str, Any] = {"username": subject.username}
    if subject.groups:
        user["groups"] = list(subject.groups)
    return user


def audit_event(record: RequestRecord, connection: ConnectionFacts, audit_id: str) -> dict[str, Any]:
    """The audit.k8s.io/v1 Event of one request (empty fields left out, as the apiserver does)."""
    info = request_info(record.method, record.target)
    event: dict[str, Any] = {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": "Metadata",
        "auditID": audit_id,
        "stage": "ResponseComplete",
        "requestURI": safe_request_uri(record.target),
        "verb": info.verb,
        "user": _user(record.user),
    }
    if record.impersonated is not None:
        event["impersonatedUser"] = _user(record.impersonated)
    if connection.source_ips:
        event["sourceIPs"] = list(connection.source_ips)
    if info.resource_request:
        ref = {"resource": info.resource, "namespace": info.namespace, "name": info.name,
               "subresource": info.subresource, "apiGroup": info.api_group, "apiVersion": info.api_version}
        event["objectRef"] = {key: value for key, value in ref.items() if value}
    event["responseStatus"] = {"metadata": {}, "code": record.code}
    event["requestReceivedTimestamp"] = rfc3339_micro(record.received)
    event["stageTimestamp"] = rfc3339_micro(record.completed)
    annotations = {
        ANNOTATION + "authentication": record.authentication,
        ANNOTATION + "latency": f"{max(record.completed - record.received, 0.0) * 1000:.3f}ms",
    }
    if connection.trace_id:
        annotations[ANNOTATION + "trace-id"] = connection.trace_id
    if connection.cluster:
        annotations[ANNOTATION + "cluster"] = connection.cluster
    if record.reason:
        annotations[ANNOTATION + "reason"] = record.reason
    event["annotations"] = annotations
    return event


class AuditLog:
    """Where audit events go: a file opened for appending (created 0600), or standard output."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self._failed = False

    @classmethod
    def open(cls, spec: str) -> AuditLog:
        """``-`` for standard output, else a file path; a clear StartupError if it cannot be opened."""
        if spec == "-":
            return cls(sys.stdout.fileno(), "standard output")
        try:
            fd = os.open(spec, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StartupError(f"cannot open --audit-log {spec}: {exc.strerror}") from None
        return cls(fd, spec)

    def write(self, event: dict[str, Any]) -> None:
        """Append one line; a failure is logged the first time and counted, never raised."""
        data = (json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
        try:
            while data:  # one write() almost always; a partial one (signal, pipe) is finished
                data = data[os.write(self.fd, data):]
        except OSError as exc:
            WRITE_FAILURES.inc()
            if not self._failed:
                self._failed = True
                log.warning("audit log write failed (further failures are only counted)", audit_log=self.name,
                            error=exc.strerror or type(exc).__name__)

    def close(self) -> None:
        if self.fd != sys.stdout.fileno():
            os.close(self.fd)


class ConnectionAudit:
    """The audit events of one connection: its facts, each request's record, one line each."""

    def __init__(self, sink: AuditLog, facts: ConnectionFacts) -> None:
        self.sink = sink
        self.facts = facts

    def record(self, record: RequestRecord) -> None:
        self.sink.write(audit_event(record, self.facts, str(uuid.uuid4())))
