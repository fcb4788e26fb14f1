"""When a token needs refreshing: less than a third of its lifetime (at most REFRESH_MARGIN_MAX) left."""

from __future__ import annotations

REFRESH_MARGIN_MAX = 60.0
UNKNOWN_EXPIRY_CACHE = 60  # a token with no visible expiry is reused this long


def fresh_enough(expires: float, issued: float, now: float) -> bool:
    lifetime = max(1.0, expires - issued)
    return expires - now > min(REFRESH_MARGIN_MAX, lifetime / 3)


def jwt_expiry(token: str) -> int | None:
    """The ``exp`` of a JWT (unverified: only to know when to refresh our own token)."""
    from clusterconnect.oidc import NotAJWT, parse_unverified

    try:
        _, claims = parse_unverified(token)
    except NotAJWT:
        return None
    exp = claims.get("exp")
    return int(exp) if isinstance(exp, (int, float)) else None
