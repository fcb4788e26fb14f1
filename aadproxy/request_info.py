"""What a request does, in the apiserver's terms: its Kubernetes verb and the object it names (pure).

A port of kube-apiserver's ``RequestInfoFactory.NewRequestInfo`` (k8s.io/apiserver, endpoints/request/
requestinfo.go), so that the auth proxy's audit events (audit.py) say ``list pods in ns`` exactly as the
apiserver's own audit log does for the same request:

- ``/api/{version}/...`` and ``/apis/{group}/{version}/...`` are resource requests; anything else
  (``/version``, ``/healthz``, ``/api``, ``/apis/{group}``) is not, and its verb is the method in lower case;
- ``/namespaces/{ns}/{resource}/...`` names a namespace, ``/namespaces/{ns}[/status|/finalize]`` the namespace
  itself; then ``resource/name/subresource``;
- the verb is the method's (POST create, GET/HEAD get, PUT update, PATCH patch, DELETE delete), or the
  legacy ``/watch/`` or ``/proxy/`` path prefix; a get without a name is a list, or a watch with
  ``watch=true`` (any value but ``0``/``false``, as the apiserver's parameter codec reads it); a delete
  without a name is a deletecollection. A ``fieldSelector=metadata.name=X`` names the object of a list.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

API_PREFIXES = ("api", "apis")
GROUPLESS_PREFIX = "api"
SPECIAL_VERBS = ("proxy", "watch")
NAMESPACE_SUBRESOURCES = ("status", "finalize")
METHOD_VERBS = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete"}


@dataclass(frozen=True)
class RequestInfo:
    verb: str
    resource_request: bool = False
    api_group: str = ""  # "" is the core group
    api_version: str = ""
    namespace: str = ""
    resource: str = ""
    name: str = ""
    subresource: str = ""


def request_info(method: str, target: str) -> RequestInfo:
    """The verb and object of ``method`` on ``target`` (path and query, as in the request line)."""
    raw_path, _, query = target.partition("?")
    plain = RequestInfo(verb=method.lower())
    parts = [unquote(part) for part in raw_path.strip("/").split("/")] if raw_path.strip("/") else []
    if len(parts) < 3 or parts[0] not in API_PREFIXES:
        return plain
    prefix, parts = parts[0], parts[1:]
    group = ""
    if prefix != GROUPLESS_PREFIX:
        if len(parts) < 3:
            return plain
        group, parts = parts[0], parts[1:]
    version, parts = parts[0], parts[1:]

    if parts[0] in SPECIAL_VERBS:
        if len(parts) < 2:
            return plain  # the apiserver answers this with an error; nothing to name
        verb, parts = parts[0], parts[1:]
    else:
        verb = METHOD_VERBS.get(method.upper(), "")

    namespace = ""
    if parts[0] == "namespaces" and len(parts) > 1:
        namespace = parts[1]
        if len(parts) > 2 and parts[2] not in NAMESPACE_SUBRESOURCES:
            parts = parts[2:]
    resource = parts[0]
    name = parts[1] if len(parts) >= 2 else ""
    subresource = parts[2] if len(parts) >= 3 and verb != "proxy" else ""

    if not name and verb == "get":
        params = parse_qsl(query, keep_blank_values=True)
        verb = "watch" if _watch(params) else "list"
        name = _selected_name(params)
    if not name and verb == "delete":
        verb = "deletecollection"
    return RequestInfo(verb=verb, resource_request=True, api_group=group, api_version=version,
                       namespace=namespace, resource=resource, name=name, subresource=subresource)


def _watch(params: list[tuple[str, str]]) -> bool:
    values = [value for key, value in params if key == "watch"]
    return bool(values) and values[0] != "0" and values[0].lower() != "false"


def _selected_name(params: list[tuple[str, str]]) -> str:
    """The name a ``fieldSelector`` requires exactly (``metadata.name=X`` or ``==X``), if it is a valid one."""
    selectors = [value for key, value in params if key == "fieldSelector"]
    if not selectors:
        return ""
    for term in selectors[0].split(","):
        field, op, value = term.partition("==") if "==" in term else term.partition("=")
        if op and field.strip() == "metadata.name" and not value.startswith("="):
            value = value.strip()
            if value and value not in (".", "..") and "/" not in value and "%" not in value:
                return value
    return ""
