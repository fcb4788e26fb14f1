"""The user's credentials and the one token source used by `clusterconnect token` (kubectl) and the proxy.

A *login* is a JSON file ``STATE_DIR/credentials/NAME.json`` (mode 600, directory mode 700) written
by ``clusterconnect login``. Kinds:

- ``relay``: the relay's built-in issuer; a refresh credential from ``login --code``, exchanged for
  access tokens with ``IdentityProvider.IssueToken`` over gRPC/TLS (the relay CA is kept in the file);
- ``oidc``: an external issuer; a refresh token from the device authorization grant (RFC 8628), or a
  client id + secret for the client credentials grant, exchanged at the issuer's token endpoint;
- ``command``: a command that prints a token (``az account get-access-token ...``).

:func:`get_token` returns a token valid for a while yet, refreshing it when less than a third of
its lifetime (at most 60 s) is left. The last access token is cached in the same file, and every
read-refresh-write happens under an exclusive ``flock``: kubectl's exec plugin processes and a
running proxy share one login, and an issuer that rotates refresh tokens never sees one used twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from clusterconnect.pki import write_private

REFRESH_MARGIN_MAX = 60.0
COMMAND_TIMEOUT = 60.0
HTTP_TIMEOUT = 15.0
UNKNOWN_EXPIRY_CACHE = 60  # a command's token with no visible expiry is reused this long


class LoginError(Exception):
    """No usable credential; the message tells the user what to do."""


def credentials_dir(state_dir: Path) -> Path:
    return state_dir / "credentials"


def profile_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:120] or "default"


def relay_profile(relay_url: str) -> str:
    parsed = urllib.parse.urlparse(relay_url if "://" in relay_url else "https://" + relay_url)
    return profile_name(f"relay-{parsed.hostname}-{parsed.port or 443}")


def _path(state_dir: Path, name: str) -> Path:
    if profile_name(name) != name:
        raise LoginError(f"invalid login name {name!r}")
    return credentials_dir(state_dir) / f"{name}.json"


def list_logins(state_dir: Path) -> list[str]:
    directory = credentials_dir(state_dir)
    return sorted(p.stem for p in directory.glob("*.json")) if directory.is_dir() else []


def save(state_dir: Path, name: str, data: dict[str, Any]) -> Path:
    path = _path(state_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    write_private(path, json.dumps(data, indent=1).encode())
    return path


def load(state_dir: Path, name: str) -> dict[str, Any]:
    path = _path(state_dir, name)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LoginError(f"not logged in ({path} does not exist); run `clusterconnect login`") from None
    except (OSError, ValueError) as exc:
        raise LoginError(f"cannot read {path}: {exc}") from None


@contextlib.contextmanager
def locked(state_dir: Path, name: str):
    path = _path(state_dir, name).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def jwt_expiry(token: str) -> int | None:
    """The ``exp`` of a JWT (unverified: only to know when to refresh our own token)."""
    from clusterconnect.oidc import NotAJWT, parse_unverified

    try:
        _, claims = parse_unverified(token)
    except NotAJWT:
        return None
    exp = claims.get("exp")
    return int(exp) if isinstance(exp, (int, float)) else None


def _fresh_enough(data: dict[str, Any], now: float) -> bool:
    token, expires, issued = data.get("access_token"), data.get("expires_unix"), data.get("issued_unix")
    if not token or not expires:
        return False
    lifetime = max(1.0, float(expires) - float(issued or now))
    return float(expires) - now > min(REFRESH_MARGIN_MAX, lifetime / 3)


def get_token(state_dir: Path, name: str) -> tuple[str, int]:
    """(token, expires_unix) of login ``name``, refreshed when needed (raises LoginError)."""
    with locked(state_dir, name):
        data = load(state_dir, name)
        now = time.time()
        if _fresh_enough(data, now):
            return data["access_token"], int(data["expires_unix"])
        kind = data.get("kind")
        if kind == "relay":
            token, expires = _refresh_relay(data)
        elif kind == "oidc":
            token, expires = _refresh_oidc(data)
        elif kind == "command":
            token, expires = _run_command(data)
        else:
            raise LoginError(f"login {name} has an unknown kind {kind!r}; log in again")
        data.update(access_token=token, expires_unix=expires, issued_unix=int(now))
        save(state_dir, name, data)
        return token, expires


# ---- the relay's built-in issuer -----------------------------------------------------------------


def _relay_stub(relay: str, ca_pem: str | None, service: str):
    import grpc

    from clusterconnect.grpc_options import CHANNEL_OPTIONS, grpc_target
    from clusterconnect.v1 import identity_pb2_grpc

    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem.encode() if ca_pem else None)
    channel = grpc.secure_channel(grpc_target(relay), credentials, options=CHANNEL_OPTIONS)
    return channel, getattr(identity_pb2_grpc, f"{service}Stub")(channel)


def login_relay(relay: str, ca_pem: str | None, code: str, device: str) -> dict[str, Any]:
    """Redeem a one-time login code at the relay; returns the login to save."""
    import grpc

    from clusterconnect.v1 import identity_pb2

    channel, stub = _relay_stub(relay, ca_pem, "IdentityProvider")
    try:
        reply = stub.Login(identity_pb2.LoginRequest(code=code, device=device), timeout=15)
    except grpc.RpcError as exc:
        raise LoginError(f"login failed: {exc.details() or exc.code().name}") from None
    finally:
        channel.close()
    return {"kind": "relay", "relay": relay, "relay_ca": ca_pem, "refresh_credential": reply.refresh_credential,
            "username": reply.username, "issuer": reply.issuer, "audience": reply.audience}


def _refresh_relay(data: dict[str, Any]) -> tuple[str, int]:
    import grpc

    from clusterconnect.grpc_options import bearer
    from clusterconnect.v1 import identity_pb2

    channel, stub = _relay_stub(data["relay"], data.get("relay_ca"), "IdentityProvider")
    try:
        reply = stub.IssueToken(identity_pb2.IssueTokenRequest(),
                                metadata=(bearer(data["refresh_credential"]),), timeout=15)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise LoginError(f"{exc.details()}") from None
        raise LoginError(f"cannot get a token from relay {data['relay']}: {exc.details() or exc.code().name}") from None
    finally:
        channel.close()
    return reply.access_token, int(reply.expires_unix)


# ---- external OIDC issuers -----------------------------------------------------------------------


def _http(url: str, ca_pem: str | None, form: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    context = ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(url, data=data, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT, context=context) as response:
            status, body = response.status, response.read(1 << 20)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(1 << 20)
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


def _client_auth(data: dict[str, Any]) -> dict[str, str]:
    form = {"client_id": data["client_id"]}
    if data.get("client_secret"):
        form["client_secret"] = data["client_secret"]
    return form


def device_login(issuer: str, ca_pem: str | None, client_id: str, client_secret: str | None, scopes: str,
                 show, sleep=time.sleep) -> dict[str, Any]:
    """RFC 8628: ask for a device code, show the user where to go, poll until they approved."""
    document = discover(issuer, ca_pem)
    endpoint = document.get("device_authorization_endpoint")
    if not endpoint:
        raise LoginError(f"{issuer} does not offer the device authorization grant (no "
                         "device_authorization_endpoint in its discovery document)")
    data = {"kind": "oidc", "issuer": issuer, "issuer_ca": ca_pem, "client_id": client_id,
            "client_secret": client_secret, "token_endpoint": document["token_endpoint"]}
    status, reply = _http(endpoint, ca_pem, {**_client_auth(data), "scope": scopes})
    if status != 200 or "device_code" not in reply:
        raise LoginError(f"device authorization failed: {_oauth_error(reply, status)}")
    show(reply.get("verification_uri_complete") or reply.get("verification_uri"), reply.get("user_code"))
    interval = float(reply.get("interval") or 5)
    deadline = time.monotonic() + float(reply.get("expires_in") or 600)
    while time.monotonic() < deadline:
        sleep(interval)
        status, tokens = _http(data["token_endpoint"], ca_pem, {
            **_client_auth(data), "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": reply["device_code"]})
        if status == 200:
            return _with_tokens(data, tokens)
        error = tokens.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += 5
            continue
        raise LoginError(f"device login failed: {_oauth_error(tokens, status)}")
    raise LoginError("device login timed out: the code was not approved in time")


def client_credentials_login(issuer: str, ca_pem: str | None, client_id: str, client_secret: str,
                             scopes: str, audience: str | None) -> dict[str, Any]:
    document = discover(issuer, ca_pem)
    data = {"kind": "oidc", "grant": "client_credentials", "issuer": issuer, "issuer_ca": ca_pem,
            "client_id": client_id, "client_secret": client_secret, "scope": scopes, "audience": audience,
            "token_endpoint": document["token_endpoint"]}
    token, expires = _refresh_oidc(data)
    return {**data, "access_token": token, "expires_unix": expires, "issued_unix": int(time.time())}


def _with_tokens(data: dict[str, Any], tokens: dict[str, Any]) -> dict[str, Any]:
    token, expires = _token_from(tokens)
    return {**data, "refresh_token": tokens.get("refresh_token"), "access_token": token,
            "expires_unix": expires, "issued_unix": int(time.time())}


def _refresh_oidc(data: dict[str, Any]) -> tuple[str, int]:
    ca = data.get("issuer_ca")
    if data.get("grant") == "client_credentials":
        form = {**_client_auth(data), "grant_type": "client_credentials"}
        if data.get("scope"):
            form["scope"] = data["scope"]
        if data.get("audience"):
            form["audience"] = data["audience"]
    else:
        if not data.get("refresh_token"):
            raise LoginError(f"the token of {data['issuer']} expired and there is no refresh token; log in again")
        form = {**_client_auth(data), "grant_type": "refresh_token", "refresh_token": data["refresh_token"]}
    status, tokens = _http(data["token_endpoint"], ca, form)
    if status != 200:
        raise LoginError(f"cannot refresh the token at {data['issuer']}: {_oauth_error(tokens, status)}; log in again")
    if tokens.get("refresh_token"):
        data["refresh_token"] = tokens["refresh_token"]  # rotated: saved by get_token under the lock
    return _token_from(tokens)


# ---- a command that prints a token ---------------------------------------------------------------


def _run_command(data: dict[str, Any]) -> tuple[str, int]:
    argv = shlex.split(data["command"])
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LoginError(f"token command failed: {exc}") from None
    if result.returncode != 0:
        raise LoginError(f"token command exited with {result.returncode}: {result.stderr.strip()[:300]}")
    output = result.stdout.strip()
    token, expires = output, None
    try:
        document = json.loads(output)
    except ValueError:
        document = None
    if isinstance(document, dict):  # az: accessToken/expires_on; others: access_token/token
        token = document.get("accessToken") or document.get("access_token") or document.get("token") or \
            document.get("id_token") or document.get("status", {}).get("token") or ""
        for key in ("expires_on", "expiresOn", "expires_unix"):
            value = document.get(key)
            if isinstance(value, (int, float)) or (isinstance(value, str) and value.isdigit()):
                expires = int(value)
                break
    if not token or any(c.isspace() for c in token):
        raise LoginError("token command printed no token")
    expires = jwt_expiry(token) or expires or int(time.time()) + UNKNOWN_EXPIRY_CACHE
    return token, expires


class CachedTokenSource:
    """For a long-running process (the proxy): ``await source.get()`` is a token valid for a while yet."""

    def __init__(self, state_dir: Path, name: str) -> None:
        import asyncio

        self.state_dir = state_dir
        self.name = name
        self._token = ""
        self._expires = 0.0
        self._obtained = 0.0
        self._lock = asyncio.Lock()

    def _fresh(self) -> bool:
        now = time.time()
        lifetime = max(1.0, self._expires - self._obtained)
        return bool(self._token) and self._expires - now > min(REFRESH_MARGIN_MAX, lifetime / 3)

    def cached(self) -> str | None:
        """The token if it is still good for a while, without waiting; None if it must be refreshed."""
        return self._token if self._fresh() else None

    async def get(self) -> str:
        import asyncio

        if self._fresh():
            return self._token
        async with self._lock:
            if not self._fresh():
                obtained = time.time()
                token, expires = await asyncio.to_thread(get_token, self.state_dir, self.name)
                self._token, self._expires, self._obtained = token, float(expires), obtained
        return self._token
