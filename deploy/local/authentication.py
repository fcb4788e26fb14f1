"""AuthenticationConfiguration files for the auth proxy in OIDC mode: which issuers it trusts.

Shared by `make demo` and the tests (tests/identities.py re-exports these), so both configure the
auth proxy the same way (docs/identity.md).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from chain import Chain


def issuer(url: str, audiences: list[str], ca_pem: str | None, username_prefix: str,
           groups_prefix: str | None) -> dict:
    """One `jwt` entry of an AuthenticationConfiguration: ``sub`` -> user name, ``groups`` -> groups
    (left out when ``groups_prefix`` is None)."""
    entry: dict = {"issuer": {"url": url, "audiences": list(audiences)},
                   "claimMappings": {"username": {"claim": "sub", "prefix": username_prefix}}}
    if ca_pem:
        entry["issuer"]["certificateAuthority"] = ca_pem
    if groups_prefix is not None:
        entry["claimMappings"]["groups"] = {"claim": "groups", "prefix": groups_prefix}
    return entry


def builtin_issuer(chain: Chain) -> dict:
    """The relay's built-in issuer as an auth proxy trusts it (docs/identity.md): audience = issuer URL,
    the relay CA, no prefixes. The relay must be running (its CA and issuer port exist)."""
    return issuer(chain.issuer_url, [chain.issuer_url], chain.relay_ca.read_text(), "", "")


def write_authentication_config(path: Path, *issuers: dict) -> Path:
    path.write_text(yaml.safe_dump({"apiVersion": "apiserver.config.k8s.io/v1", "kind": "AuthenticationConfiguration",
                                    "jwt": list(issuers)}))
    return path
