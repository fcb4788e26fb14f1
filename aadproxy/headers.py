"""Which request and response headers cross the proxy (pure functions, no I/O).

Hop-by-hop headers describe one connection, not the message, so a proxy never forwards them
(RFC 9110 section 7.6.1): ``Connection`` and every header it names, plus the fixed list below.
Filtering ``Connection``-named headers *before* authentication matters: CVE-2021-31999 used
``Connection: Impersonate-User`` to make a proxy delete a header it had itself just set. Here the
client's ``Connection`` can only remove the client's own headers; the authenticator adds its
headers afterwards, to the already filtered list.

Header names are lowercase bytes (http_reader.py lowercases what llhttp parses).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Header = tuple[bytes, bytes]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def values(headers: Iterable[Header], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]


def connection_tokens(headers: Iterable[Header]) -> set[bytes]:
    """The lowercase tokens of every ``Connection`` header (several headers are one list)."""
    tokens: set[bytes] = set()
    for value in values(headers, b"connection"):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def strip_hop_by_hop(headers: Iterable[Header]) -> list[Header]:
    """``headers`` without the hop-by-hop ones (fixed list and those named in ``Connection``)."""
    headers = [(name.lower(), value) for name, value in headers]
    drop = HOP_BY_HOP | connection_tokens(headers)
    return [(name, value) for name, value in headers if name not in drop]


def upgrade_protocol(headers: Sequence[Header]) -> bytes | None:
    """The protocol a request asks to switch to (``Connection: Upgrade`` + one ``Upgrade``), or None."""
    if b"upgrade" not in connection_tokens(headers):
        return None
    offered = values(headers, b"upgrade")
    if len(offered) != 1 or not offered[0].strip():
        return None
    return offered[0].strip()


def upgrade_headers(protocol: bytes) -> list[Header]:
    """The hop-by-hop pair that carries an upgrade across one hop (re-set after filtering)."""
    return [(b"connection", b"Upgrade"), (b"upgrade", protocol)]


def is_chunked(headers: Iterable[Header]) -> bool:
    return any(name == b"transfer-encoding" for name, _ in headers)


def has_conflicting_framing(headers: Sequence[Header]) -> bool:
    """Both ``Content-Length`` and ``Transfer-Encoding``: request smuggling material; refuse it.

    (llhttp refuses it itself, in requests and responses; h11, the parser before it, accepted it, as
    RFC 9112 permits: this stays the rule whatever parses.)
    """
    names = {name for name, _ in headers}
    return b"content-length" in names and b"transfer-encoding" in names
