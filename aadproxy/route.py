"""A Kubernetes API path as a template, for a request span's name and ``http.route``: the names of
namespaces and objects become ``{namespace}`` and ``{name}``, so one kind of request reads the same in
every trace (``GET /api/v1/namespaces/{namespace}/pods/{name}``) and no object name is exported.

Group, version, resource and subresource stay as sent (few, and they say what was asked); past a
subresource (``proxy/...``) and past the second segment of a non-API path (``/openapi/v3/...``) the
rest is ``{path}``.
"""

from __future__ import annotations

# Subresources of a Namespace itself: /api/v1/namespaces/NAME/status is not a resource "status" in NAME.
_NAMESPACE_SUBRESOURCES = ("status", "finalize")


def route(path: str) -> str:
    """The template of ``path`` (no query)."""
    segments = [s for s in path.split("/") if s]
    if not segments:
        return "/"
    if segments[0] == "api":
        head, rest = segments[:2], segments[2:]
    elif segments[0] == "apis":
        head, rest = segments[:3], segments[3:]
    else:
        return "/" + "/".join(segments[:2] + (["{path}"] if len(segments) > 2 else []))
    if rest[:1] == ["watch"]:  # the old /api/v1/watch/... form of ?watch=true
        head, rest = [*head, "watch"], rest[1:]
    if rest[:1] == ["namespaces"] and len(rest) >= 2:
        if len(rest) == 2 or (len(rest) == 3 and rest[2] in _NAMESPACE_SUBRESOURCES):
            return "/" + "/".join([*head, "namespaces", "{name}", *rest[2:]])
        head, rest = [*head, "namespaces", "{namespace}"], rest[2:]
    return "/" + "/".join(head + _resource(rest))


def _resource(rest: list[str]) -> list[str]:
    """RESOURCE[/NAME[/SUBRESOURCE[/...]]] templated."""
    out = rest[:1]
    if len(rest) >= 2:
        out.append("{name}")
    if len(rest) >= 3:
        out.append(rest[2])
    if len(rest) >= 4:
        out.append("{path}")
    return out
