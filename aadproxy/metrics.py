"""The auth proxy's metrics (clusterconnect_aadproxy_*), counted once per request where its audit event is
logged (http_forwarder.py), and its readiness: the apiserver answers, and accepts its credential.

``verb`` is told from the request line only (the proxy does not parse resource paths): the HTTP method
in lower case, ``watch`` for a GET with ``watch=true`` or ``watch=1``, and ``connect`` for an upgrade
(exec, attach, port-forward). ``code`` is the status the client got (0: none, the connection broke first).
"""

from __future__ import annotations

from prometheus_client import Counter

from clusterconnect import health, metrics
from clusterconnect.aadproxy.apiserver import ApiServer
from clusterconnect.aadproxy.kubeapi import request_json

REQUESTS = Counter("clusterconnect_aadproxy_requests_total",
                   "HTTP requests answered, forwarded or refused, by verb and status code",
                   ["verb", "code"], registry=metrics.REGISTRY)
AUTH_FAILURES = Counter("clusterconnect_aadproxy_authentication_failures_total",
                        "Requests refused before anything was forwarded, by reason (credential: missing or"
                        " malformed bearer token; malformed, issuer, invalid: the JWT; impersonation;"
                        " connection-identity: not the connection's caller; no-credential: the proxy's own)",
                        ["reason"], registry=metrics.REGISTRY)
REQUEST_BYTES = Counter("clusterconnect_aadproxy_request_body_bytes_total",
                        "Request body bytes forwarded to the apiserver", registry=metrics.REGISTRY)
RESPONSE_BYTES = Counter("clusterconnect_aadproxy_response_body_bytes_total",
                         "Response body bytes passed back from the apiserver", registry=metrics.REGISTRY)


def verb(method: bytes, target: bytes, upgrade: bool) -> str:
    if upgrade:
        return "connect"
    if method == b"GET":
        _, _, query = target.partition(b"?")
        if query and any(part in (b"watch=true", b"watch=1") for part in query.split(b"&")):
            return "watch"
    return method.decode("ascii", "replace").lower()[:16]


def request(verb: str, status: int, request_bytes: int, response_bytes: int) -> None:
    REQUESTS.labels(verb, str(status)).inc()
    if request_bytes:
        REQUEST_BYTES.inc(request_bytes)
    if response_bytes:
        RESPONSE_BYTES.inc(response_bytes)


def authentication_failed(reason: str) -> None:
    AUTH_FAILURES.labels(reason).inc()


def apiserver_ready(target: ApiServer) -> health.Probe:
    """Ready while the apiserver answers the proxy's own request (GET /api, discovery). With a credential of
    its own (OIDC mode's ServiceAccount token), 401 or 403 means the apiserver refuses it: not ready. Without
    one (token passthrough), any answer will do: each request brings its caller's token."""

    async def probe() -> str | None:
        status, _ = await request_json(target, "GET", "/api")
        if status == 200:
            return None
        if status in (401, 403):
            return f"the apiserver refuses the auth proxy's credential ({status})" if target.token.get() else None
        return f"the apiserver answered {status}"

    return probe
