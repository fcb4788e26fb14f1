"""The user's credentials: logins saved by ``clusterconnect login`` and the one token source used by
``clusterconnect token`` (kubectl's exec plugin) and the client proxy.

A login is one of three typed records (records.py), saved as JSON in ``STATE_DIR/credentials/``:

- :class:`BuiltinLogin`: the relay's built-in issuer; a refresh credential from ``login --code``,
  exchanged for access tokens with ``IdentityProvider.IssueToken`` over gRPC/TLS (builtin.py);
- :class:`OidcLogin`: an external issuer; a refresh token from the device authorization grant
  (RFC 8628), or a client id + secret for the client credentials grant (oidc_issuer.py);
- :class:`CommandLogin`: a command that prints a token (command.py).

:func:`get_token` returns a token valid for a while yet, refreshing it when less than a third of
its lifetime (at most 60 s) is left (store.py); :func:`logout` revokes a login and deletes it.
"""

from clusterconnect.credentials.builtin import login_relay
from clusterconnect.credentials.errors import LoginError
from clusterconnect.credentials.oidc_issuer import client_credentials_login, device_login
from clusterconnect.credentials.records import (
    AnyLogin,
    BuiltinLogin,
    CommandLogin,
    Login,
    LoginKind,
    OidcGrant,
    OidcLogin,
)
from clusterconnect.credentials.source import CachedTokenSource
from clusterconnect.credentials.store import (
    get_token,
    list_logins,
    load,
    logout,
    profile_name,
    refresh,
    relay_profile,
    save,
)

__all__ = [
    "AnyLogin", "BuiltinLogin", "CachedTokenSource", "CommandLogin", "Login", "LoginError", "LoginKind",
    "OidcGrant", "OidcLogin", "client_credentials_login", "device_login", "get_token", "list_logins", "load",
    "login_relay", "logout", "profile_name", "refresh", "relay_profile", "save",
]
