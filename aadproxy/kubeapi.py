"""The auth proxy's own small requests to the apiserver, with its own credential.

Used for SubjectAccessReviews (may the OIDC caller impersonate what it asks for?), for reading the
cluster's ServiceAccount issuer from the apiserver's discovery document, and for ``/version`` (the
Info RPC). One short-lived connection per call; bodies are bounded. The credential is never logged.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import h11

from clusterconnect.aadproxy.apiserver import ApiServer
from clusterconnect.errors import Unavailable

REQUEST_TIMEOUT = 10.0
MAX_BODY = 1024 * 1024


class ApiError(Unavailable):
    """The apiserver could not answer (message safe to log)."""


async def request_json(
    api: ApiServer, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """One request with the proxy's own credential; (status, JSON object or {})."""
    return await asyncio.wait_for(_request_json(api, method, path, body), REQUEST_TIMEOUT)


async def _request_json(
    api: ApiServer, method: str, path: str, body: dict[str, Any] | None
) -> tuple[int, dict[str, Any]]:
    try:
        stream = await api.connect(own_identity=True)
    except OSError as exc:
        raise ApiError(f"cannot reach the apiserver: {type(exc).__name__}") from None
    try:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        payload = json.dumps(body).encode() if body is not None else b""
        headers = [(b"host", api.address.encode()), (b"accept", b"application/json")]
        if body is not None:
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        token = api.token.get()
        if token:
            headers.append((b"authorization", b"Bearer " + token.encode()))
        data = conn.send(h11.Request(method=method.encode(), target=path.encode(), headers=headers))
        if payload:
            data += conn.send(h11.Data(data=payload))
        data += conn.send(h11.EndOfMessage())
        await stream.send(data)
        status, answer = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive())
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                answer += event.data
                if len(answer) > MAX_BODY:
                    raise ApiError("apiserver answer too large")
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ApiError("apiserver closed the connection")
    except h11.ProtocolError as exc:
        raise ApiError(f"bad answer from the apiserver ({type(exc).__name__})") from None
    finally:
        await stream.close()
    try:
        document = json.loads(answer) if answer else {}
    except ValueError:
        document = {}
    return status, document if isinstance(document, dict) else {}


async def fetch_version(api: ApiServer) -> str:
    """``gitVersion`` from ``GET /version``, with the proxy's own credential (or anonymously)."""
    status, document = await request_json(api, "GET", "/version")
    if status != 200:
        raise ApiError(f"/version answered HTTP {status}")
    version = document.get("gitVersion", "")
    if not isinstance(version, str) or not version:
        raise ApiError("/version has no gitVersion string")
    return version


async def serviceaccount_issuer(api: ApiServer) -> str:
    """The cluster's ServiceAccount token issuer (``iss``), from the apiserver's OIDC discovery."""
    status, document = await request_json(api, "GET", "/.well-known/openid-configuration")
    issuer = document.get("issuer")
    if status != 200 or not isinstance(issuer, str) or not issuer:
        raise ApiError(f"apiserver discovery answered HTTP {status} without an issuer")
    return issuer


@dataclass(frozen=True)
class ResourceAttributes:
    resource: str
    name: str
    group: str = ""
    subresource: str = ""
    namespace: str = ""

    def as_dict(self) -> dict[str, str]:
        attributes = {"verb": "impersonate", "resource": self.resource, "name": self.name, "group": self.group}
        if self.subresource:
            attributes["subresource"] = self.subresource
        if self.namespace:
            attributes["namespace"] = self.namespace
        return attributes

    def describe(self) -> str:
        kind = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        where = f" in namespace {self.namespace}" if self.namespace else ""
        return f'{kind} "{self.name}"{where}'


# Who asks (user, groups, uid, extra) and for what.
_ReviewKey = tuple[str, tuple[str, ...], str | None, tuple[tuple[str, tuple[str, ...]], ...], ResourceAttributes]


class AccessReviewer:
    """``SubjectAccessReview``s with the proxy's credential; answers cached briefly."""

    def __init__(self, api: ApiServer, *, ttl: float = 10.0, max_entries: int = 4096) -> None:
        self.api = api
        self.ttl = ttl
        self.max_entries = max_entries
        self._cache: OrderedDict[_ReviewKey, tuple[float, bool]] = OrderedDict()

    async def allowed(
        self,
        user: str,
        groups: Sequence[str],
        uid: str | None,
        extra: Mapping[str, Sequence[str]],
        attributes: ResourceAttributes,
    ) -> bool:
        key: _ReviewKey = (
            user, tuple(groups), uid, tuple(sorted((k, tuple(v)) for k, v in extra.items())), attributes
        )
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(key)
            return hit[1]
        spec: dict[str, Any] = {"user": user, "groups": list(groups), "resourceAttributes": attributes.as_dict()}
        if uid:
            spec["uid"] = uid
        if extra:
            spec["extra"] = {k: list(v) for k, v in extra.items()}
        status, answer = await request_json(
            self.api, "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec},
        )
        if status != 201 and status != 200:
            raise ApiError(f"SubjectAccessReview answered HTTP {status}")
        result = answer.get("status") or {}
        allowed = bool(result.get("allowed")) and not result.get("denied")
        self._cache[key] = (now + self.ttl, allowed)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return allowed
