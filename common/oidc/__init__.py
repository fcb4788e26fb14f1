"""OIDC token verification shared by the auth proxy and the relay (one implementation).

- :func:`load_config` / :func:`parse_config`: kube-apiserver style ``AuthenticationConfiguration``.
- :class:`Verifier`: ``await verifier.verify(token) -> Identity`` or raises :class:`TokenError`
  (:class:`UnknownIssuer` for a well-formed JWT of an issuer that is not configured, :class:`NotAJWT`).
- :func:`unverified_issuer`: the ``iss`` a token claims, for routing only (never for trust).
"""

from clusterconnect.oidc.config import AuthenticationConfig, ConfigError, IssuerConfig
from clusterconnect.oidc.config import load as load_config
from clusterconnect.oidc.config import parse as parse_config
from clusterconnect.oidc.keys import ALLOWED_ALGORITHMS, IssuerKeys, KeysUnavailable, fetch_json
from clusterconnect.oidc.verifier import (
    Identity,
    NotAJWT,
    Principal,
    TokenError,
    UnknownIssuer,
    Verifier,
    map_claims,
    parse_unverified,
    principal,
    unverified_issuer,
)

__all__ = [
    "ALLOWED_ALGORITHMS",
    "AuthenticationConfig",
    "ConfigError",
    "Identity",
    "IssuerConfig",
    "IssuerKeys",
    "KeysUnavailable",
    "NotAJWT",
    "Principal",
    "TokenError",
    "UnknownIssuer",
    "Verifier",
    "fetch_json",
    "load_config",
    "map_claims",
    "parse_config",
    "parse_unverified",
    "principal",
    "unverified_issuer",
]
