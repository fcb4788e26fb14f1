"""Typed logins, and their JSON form on disk (``{"kind": ..., fields...}``, the format files always had).

Each record also carries the last access token it produced (``access_token``, ``expires_unix``,
``issued_unix``), cached so that kubectl's exec plugin does not refresh on every call.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from clusterconnect.credentials.errors import LoginError


class LoginKind(enum.StrEnum):
    BUILTIN = "relay"  # the relay's built-in issuer
    OIDC = "oidc"  # an external OpenID Connect issuer
    COMMAND = "command"  # a command that prints a token


class OidcGrant(enum.StrEnum):
    DEVICE_CODE = "device_code"  # a person approved a device code; refreshed with the refresh token
    CLIENT_CREDENTIALS = "client_credentials"  # a client id + secret (CI); a new token each time


@dataclass(kw_only=True)
class Login:
    access_token: str | None = None
    expires_unix: int | None = None
    issued_unix: int | None = None


@dataclass(kw_only=True)
class BuiltinLogin(Login):
    """A refresh credential from ``clusterconnect login --code``, exchanged at the relay for access tokens."""

    relay: str
    relay_ca: str | None  # PEM; None: the system's trust store
    refresh_credential: str
    username: str = ""
    issuer: str = ""
    audience: str = ""
    # Public id at the relay (`users credentials`) and when the relay stops accepting the credential;
    # None in logins saved by earlier versions.
    credential_id: str | None = None
    credential_expires_unix: int | None = None


@dataclass(kw_only=True)
class OidcLogin(Login):
    issuer: str
    issuer_ca: str | None
    client_id: str
    token_endpoint: str
    client_secret: str | None = None
    grant: OidcGrant = OidcGrant.DEVICE_CODE
    refresh_token: str | None = None  # device code grant; rotated by some issuers
    scope: str | None = None  # client credentials grant
    audience: str | None = None  # client credentials grant


@dataclass(kw_only=True)
class CommandLogin(Login):
    command: str  # shell-like words, split with shlex, never run through a shell


AnyLogin = BuiltinLogin | OidcLogin | CommandLogin

_KINDS: dict[LoginKind, type[AnyLogin]] = {
    LoginKind.BUILTIN: BuiltinLogin,
    LoginKind.OIDC: OidcLogin,
    LoginKind.COMMAND: CommandLogin,
}


def kind_of(login: AnyLogin) -> LoginKind:
    return next(kind for kind, cls in _KINDS.items() if isinstance(login, cls))


def to_json(login: AnyLogin) -> dict[str, Any]:
    document: dict[str, Any] = {"kind": kind_of(login).value}
    for item in dataclasses.fields(login):
        value = getattr(login, item.name)
        document[item.name] = value.value if isinstance(value, enum.Enum) else value
    return document


def from_json(document: Any, name: str) -> AnyLogin:
    """The record of a login file; LoginError if it is not one (unknown kind, a field missing)."""
    if not isinstance(document, dict):
        raise LoginError(f"login {name} is not a JSON object; log in again")
    try:
        cls = _KINDS[LoginKind(str(document.get("kind")))]
    except ValueError:
        raise LoginError(f"login {name} has an unknown kind {document.get('kind')!r}; log in again") from None
    known = {item.name for item in dataclasses.fields(cls)}
    values = {key: value for key, value in document.items() if key in known}  # newer fields: ignored
    if cls is OidcLogin:
        try:
            values["grant"] = OidcGrant(values.get("grant") or OidcGrant.DEVICE_CODE)
        except ValueError:
            raise LoginError(f"login {name} has an unknown grant {values.get('grant')!r}; log in again") from None
    try:
        return cls(**values)
    except TypeError:
        missing = sorted(item.name for item in dataclasses.fields(cls)
                         if item.name not in values and item.default is dataclasses.MISSING
                         and item.default_factory is dataclasses.MISSING)
        raise LoginError(f"login {name} lacks {', '.join(missing)}; log in again") from None
