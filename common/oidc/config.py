"""The authentication configuration, in the shape of kube-apiserver's structured ``AuthenticationConfiguration``.

Accepted (``apiVersion: apiserver.config.k8s.io/v1``, also ``v1beta1``/``v1alpha1``; ``kind:
AuthenticationConfiguration``)::

    jwt:
    - issuer:
        url: https://issuer.example          # exact ``iss``; https only
        discoveryURL: https://...            # optional; where to read the discovery document
        audiences: [my-client]               # at least one; the token's ``aud`` must contain one
        audienceMatchPolicy: MatchAny        # optional; the only policy
        certificateAuthority: |              # optional PEM; default: the system trust store
          -----BEGIN CERTIFICATE-----
      claimValidationRules:
      - {claim: hd, requiredValue: example.com}
      claimMappings:
        username: {claim: sub, prefix: "oidc:"}   # prefix required (may be "")
        groups: {claim: groups, prefix: "oidc:"}  # optional; claim is a string or a list of strings
        uid: {claim: sub}                         # optional
        extra:                                    # optional; only the "claims.NAME" expression form
        - {key: example.org/tenant, valueExpression: "claims.tid"}

Differences from kube-apiserver, checked at load time with a clear error: CEL ``expression`` forms are
not evaluated (except ``claims.NAME`` / ``claims["NAME"]`` in ``extra``), ``userValidationRules`` and
``anonymous``/``authorization`` sections are refused rather than ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from clusterconnect.errors import InvalidInput

API_VERSIONS = {
    "apiserver.config.k8s.io/v1",
    "apiserver.config.k8s.io/v1beta1",
    "apiserver.config.k8s.io/v1alpha1",
}

_EXTRA_EXPRESSION = re.compile(r"""^\s*claims\s*(?:\.\s*([A-Za-z_][A-Za-z0-9_]*)|\[\s*(["'])(.+?)\2\s*\])\s*$""")


class ConfigError(InvalidInput):
    """The authentication configuration is invalid; the message says where."""


@dataclass(frozen=True)
class PrefixedClaim:
    claim: str
    prefix: str = ""


@dataclass(frozen=True)
class ExtraMapping:
    key: str
    claim: str


@dataclass(frozen=True)
class ClaimValidationRule:
    claim: str
    required_value: str


@dataclass(frozen=True)
class IssuerConfig:
    url: str
    audiences: tuple[str, ...]
    discovery_url: str | None = None
    certificate_authority: str | None = None  # PEM
    username: PrefixedClaim = PrefixedClaim("sub", "")
    groups: PrefixedClaim | None = None
    uid: str | None = None
    extra: tuple[ExtraMapping, ...] = ()
    claim_validation_rules: tuple[ClaimValidationRule, ...] = ()


@dataclass(frozen=True)
class AuthenticationConfig:
    issuers: tuple[IssuerConfig, ...] = field(default_factory=tuple)

    def issuer(self, url: str) -> IssuerConfig | None:
        for item in self.issuers:
            if item.url == url:
                return item
        return None


def load(path: str | Path) -> AuthenticationConfig:
    """Read and validate an AuthenticationConfiguration YAML/JSON file."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {' '.join(str(exc).split())}") from exc
    return parse(document, source=str(path))


def parse(document: object, source: str = "authentication configuration") -> AuthenticationConfig:
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a mapping")
    api_version, kind = document.get("apiVersion"), document.get("kind")
    if api_version not in API_VERSIONS:
        raise ConfigError(f"{source}: apiVersion must be one of {sorted(API_VERSIONS)}, got {api_version!r}")
    if kind != "AuthenticationConfiguration":
        raise ConfigError(f"{source}: kind must be AuthenticationConfiguration, got {kind!r}")
    for unsupported in ("anonymous",):
        if document.get(unsupported):
            raise ConfigError(f"{source}: {unsupported} is not supported by this proxy")
    entries = document.get("jwt") or []
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: jwt must be a non-empty list")
    issuers = tuple(_issuer(entry, f"{source}: jwt[{i}]") for i, entry in enumerate(entries))
    seen: set[str] = set()
    for item in issuers:
        if item.url in seen:
            raise ConfigError(f"{source}: issuer {item.url} is configured twice")
        seen.add(item.url)
    return AuthenticationConfig(issuers=issuers)


def _mapping(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping")
    return value


def _https_url(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: required")
    parsed = urlparse(value)
    if parsed.scheme != "https" or not parsed.hostname:
        raise ConfigError(f"{where}: must be an https:// URL, got {value!r}")
    if parsed.query or parsed.fragment or parsed.username or parsed.password:
        raise ConfigError(f"{where}: must not have query, fragment or user info")
    return value


def _string(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: must be a non-empty string")
    return value


def _optional_string(value: object, where: str) -> str | None:
    return None if value is None else _string(value, where)


def _no_expression(section: dict[str, Any], where: str) -> None:
    if section.get("expression"):
        raise ConfigError(f"{where}: CEL expressions are not supported here; use claim (and prefix)")


def _issuer(entry: object, where: str) -> IssuerConfig:
    entry = _mapping(entry, where)
    issuer = _mapping(entry.get("issuer"), f"{where}.issuer")
    url = _https_url(issuer.get("url"), f"{where}.issuer.url")
    discovery = issuer.get("discoveryURL")
    if discovery is not None:
        discovery = _https_url(discovery, f"{where}.issuer.discoveryURL")
    audiences = issuer.get("audiences")
    if not isinstance(audiences, list) or not audiences or not all(isinstance(a, str) and a for a in audiences):
        raise ConfigError(f"{where}.issuer.audiences: must be a non-empty list of strings")
    policy = issuer.get("audienceMatchPolicy")
    if policy not in (None, "", "MatchAny"):
        raise ConfigError(f"{where}.issuer.audienceMatchPolicy: only MatchAny is supported")
    ca = issuer.get("certificateAuthority")
    if ca is not None and (not isinstance(ca, str) or "BEGIN CERTIFICATE" not in ca):
        raise ConfigError(f"{where}.issuer.certificateAuthority: must be PEM certificate data")

    if entry.get("userValidationRules"):
        raise ConfigError(f"{where}.userValidationRules: not supported (CEL)")
    rules = []
    for i, rule in enumerate(entry.get("claimValidationRules") or []):
        rule = _mapping(rule, f"{where}.claimValidationRules[{i}]")
        _no_expression(rule, f"{where}.claimValidationRules[{i}]")
        claim = _string(rule.get("claim"), f"{where}.claimValidationRules[{i}].claim")
        value = rule.get("requiredValue")
        if not isinstance(value, str):
            raise ConfigError(f"{where}.claimValidationRules[{i}].requiredValue: must be a string")
        rules.append(ClaimValidationRule(claim, value))

    mappings = _mapping(entry.get("claimMappings"), f"{where}.claimMappings")
    user = _mapping(mappings.get("username"), f"{where}.claimMappings.username")
    _no_expression(user, f"{where}.claimMappings.username")
    user_claim = _string(user.get("claim"), f"{where}.claimMappings.username.claim")
    user_prefix = user.get("prefix")
    if not isinstance(user_prefix, str):
        # As in kube-apiserver: an explicit prefix (possibly "") so nobody maps "sub" onto a
        # cluster user name by accident.
        raise ConfigError(f"{where}.claimMappings.username.prefix: required (may be \"\")")

    groups = None
    group_section = _mapping(mappings.get("groups"), f"{where}.claimMappings.groups")
    _no_expression(group_section, f"{where}.claimMappings.groups")
    if group_section.get("claim"):
        prefix = group_section.get("prefix")
        if not isinstance(prefix, str):
            raise ConfigError(f"{where}.claimMappings.groups.prefix: required (may be \"\")")
        groups = PrefixedClaim(_string(group_section["claim"], f"{where}.claimMappings.groups.claim"), prefix)

    uid_section = _mapping(mappings.get("uid"), f"{where}.claimMappings.uid")
    _no_expression(uid_section, f"{where}.claimMappings.uid")
    uid = _optional_string(uid_section.get("claim"), f"{where}.claimMappings.uid.claim")

    extra = []
    for i, item in enumerate(mappings.get("extra") or []):
        item = _mapping(item, f"{where}.claimMappings.extra[{i}]")
        key = _string(item.get("key"), f"{where}.claimMappings.extra[{i}].key")
        if key != key.lower() or "/" not in key:
            raise ConfigError(f"{where}.claimMappings.extra[{i}].key: must be lowercase and domain-prefixed")
        match = _EXTRA_EXPRESSION.match(str(item.get("valueExpression") or ""))
        if not match:
            raise ConfigError(
                f"{where}.claimMappings.extra[{i}].valueExpression: only claims.NAME or claims[\"NAME\"] is supported"
            )
        extra.append(ExtraMapping(key, match.group(1) or match.group(3)))

    return IssuerConfig(
        url=url,
        audiences=tuple(audiences),
        discovery_url=discovery,
        certificate_authority=ca,
        username=PrefixedClaim(user_claim, user_prefix),
        groups=groups,
        uid=uid,
        extra=tuple(extra),
        claim_validation_rules=tuple(rules),
    )
