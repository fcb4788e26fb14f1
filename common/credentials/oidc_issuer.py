"""External OpenID Connect issuers: the device authorization grant (RFC 8628) for people, the client
credentials grant for CI, and refreshing either at the issuer's token endpoint."""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from clusterconnect.credentials.errors import LoginError
from clusterconnect.credentials.expiry import UNKNOWN_EXPIRY_CACHE, jwt_expiry
from clusterconnect.credentials.records import OidcGrant, OidcLogin

HTTP_TIMEOUT = 15.0
MAX_RESPONSE = 1 << 20


def _http(url: str, ca_pem: str | None, form: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    context = ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(url, data=data, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT, context=context) as response:
            status, body = response.status, response.read(MAX_RESPONSE)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(MAX_RESPONSE)
    except (urllib.error.URLError, OSError) as exc:
        raise LoginError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    try:
        document = json.loads(body or b"{}")
    except ValueError:
        document = {}
    return status, document if isinstance(document, dict) else {}


def discover(issuer: str, ca_pem: str | None) -> dict[str, Any]:
    status, document = _http(issuer.rstrip("/") + "/.well-known/openid-configuration", ca_pem)
    if status != 200 or document.get("issuer") != issuer:
        raise LoginError(f"{issuer} has no usable OpenID Connect discovery document (HTTP {status})")
    return document


def _token_from(document: dict[str, Any]) -> tuple[str, int]:
    """Prefer the id_token (what Kubernetes OIDC verifies; aud = client id), else the access token."""
    token = document.get("id_token") or document.get("access_token")
    if not isinstance(token, str) or not token:
        raise LoginError("the issuer's token response has no token")
    expires = jwt_expiry(token)
    if expires is None:
        expires = int(time.time()) + int(document.get("expires_in") or UNKNOWN_EXPIRY_CACHE)
    return token, expires


def _oauth_error(document: dict[str, Any], status: int) -> str:
    error = document.get("error") or f"HTTP {status}"
    description = document.get("error_description") or document.get("error_hint") or ""
    return f"{error}: {description}".rstrip(": ")


def _client_auth(login: OidcLogin) -> dict[str, str]:
    form = {"client_id": login.client_id}
    if login.client_secret:
        form["client_secret"] = login.client_secret
    return form


def _with_tokens(login: OidcLogin, tokens: dict[str, Any]) -> OidcLogin:
    login.access_token, login.expires_unix = _token_from(tokens)
    login.issued_unix = int(time.time())
    login.refresh_token = tokens.get("refresh_token")
    return login


def device_login(issuer: str, ca_pem: str | None, client_id: str, client_secret: str | None, scopes: str,
                 show: Callable[[str, str], None], sleep: Callable[[float], None] = time.sleep) -> OidcLogin:
    """RFC 8628: ask for a device code, show the user where to go, poll until they approved."""
    document = discover(issuer, ca_pem)
    endpoint = document.get("device_authorization_endpoint")
    if not endpoint:
        raise LoginError(f"{issuer} does not offer the device authorization grant (no "
                         "device_authorization_endpoint in its discovery document)")
    login = OidcLogin(issuer=issuer, issuer_ca=ca_pem, client_id=client_id, client_secret=client_secret,
                      token_endpoint=document["token_endpoint"], grant=OidcGrant.DEVICE_CODE)
    status, reply = _http(endpoint, ca_pem, {**_client_auth(login), "scope": scopes})
    if status != 200 or "device_code" not in reply:
        raise LoginError(f"device authorization failed: {_oauth_error(reply, status)}")
    show(reply.get("verification_uri_complete") or reply.get("verification_uri") or "", reply.get("user_code") or "")
    interval = float(reply.get("interval") or 5)
    deadline = time.monotonic() + float(reply.get("expires_in") or 600)
    while time.monotonic() < deadline:
        sleep(interval)
        status, tokens = _http(login.token_endpoint, ca_pem, {
            **_client_auth(login), "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": reply["device_code"]})
        if status == 200:
            return _with_tokens(login, tokens)
        error = tokens.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += 5
            continue
        raise LoginError(f"device login failed: {_oauth_error(tokens, status)}")
    raise LoginError("device login timed out: the code was not approved in time")


def client_credentials_login(issuer: str, ca_pem: str | None, client_id: str, client_secret: str,
                             scopes: str, audience: str | None) -> OidcLogin:
    document = discover(issuer, ca_pem)
    login = OidcLogin(issuer=issuer, issuer_ca=ca_pem, client_id=client_id, client_secret=client_secret,
                      token_endpoint=document["token_endpoint"], grant=OidcGrant.CLIENT_CREDENTIALS,
                      scope=scopes, audience=audience)
    login.access_token, login.expires_unix = refresh_oidc(login)
    login.issued_unix = int(time.time())
    return login


def refresh_oidc(login: OidcLogin) -> tuple[str, int]:
    """A new token at the issuer's token endpoint: (token, expires_unix). A rotated refresh token is
    kept in ``login`` (the store saves it under the login's lock)."""
    if login.grant == OidcGrant.CLIENT_CREDENTIALS:
        form = {**_client_auth(login), "grant_type": "client_credentials"}
        if login.scope:
            form["scope"] = login.scope
        if login.audience:
            form["audience"] = login.audience
    else:
        if not login.refresh_token:
            raise LoginError(f"the token of {login.issuer} expired and there is no refresh token; log in again")
        form = {**_client_auth(login), "grant_type": "refresh_token", "refresh_token": login.refresh_token}
    status, tokens = _http(login.token_endpoint, login.issuer_ca, form)
    if status != 200:
        raise LoginError(f"cannot refresh the token at {login.issuer}: {_oauth_error(tokens, status)}; log in again")
    if tokens.get("refresh_token"):
        login.refresh_token = tokens["refresh_token"]
    return _token_from(tokens)
