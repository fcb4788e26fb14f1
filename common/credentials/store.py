"""Logins on disk: ``STATE_DIR/credentials/NAME.json`` (mode 600, directory mode 700), and
:func:`get_token`, which returns a login's token, refreshing it when needed.

Every read-refresh-write happens under an exclusive ``flock`` of ``NAME.lock``: kubectl's exec plugin
processes and a running proxy share one login, and an issuer that rotates refresh tokens never sees
one used twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from clusterconnect.credentials.builtin import logout_builtin, refresh_builtin
from clusterconnect.credentials.command import run_command
from clusterconnect.credentials.errors import LoginError
from clusterconnect.credentials.expiry import fresh_enough
from clusterconnect.credentials.oidc_issuer import refresh_oidc
from clusterconnect.credentials.records import AnyLogin, BuiltinLogin, OidcLogin, from_json, to_json
from clusterconnect.pki import write_private


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


def save(state_dir: Path, name: str, login: AnyLogin) -> Path:
    path = _path(state_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    write_private(path, json.dumps(to_json(login), indent=1).encode())
    return path


def load(state_dir: Path, name: str) -> AnyLogin:
    path = _path(state_dir, name)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise LoginError(f"not logged in ({path} does not exist); run `clusterconnect login`") from None
    except (OSError, ValueError) as exc:
        raise LoginError(f"cannot read {path}: {exc}") from None
    return from_json(document, name)


@contextlib.contextmanager
def locked(state_dir: Path, name: str) -> Iterator[None]:
    path = _path(state_dir, name).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def refresh(login: AnyLogin) -> tuple[str, int]:
    """A new token for the login from its issuer (or command): (token, expires_unix)."""
    if isinstance(login, BuiltinLogin):
        return refresh_builtin(login)
    if isinstance(login, OidcLogin):
        return refresh_oidc(login)
    return run_command(login)


def get_token(state_dir: Path, name: str) -> tuple[str, int]:
    """(token, expires_unix) of login ``name``, refreshed when needed (raises LoginError)."""
    with locked(state_dir, name):
        login = load(state_dir, name)
        now = time.time()
        if login.access_token and login.expires_unix and \
                fresh_enough(login.expires_unix, login.issued_unix or now, now):
            return login.access_token, int(login.expires_unix)
        token, expires = refresh(login)
        login.access_token, login.expires_unix, login.issued_unix = token, expires, int(now)
        save(state_dir, name, login)
        return token, expires


def logout(state_dir: Path, name: str) -> bool | None:
    """Revoke login ``name`` at its issuer where that is possible, then delete it. True: revoked at the
    relay; False: the relay no longer knew it; None: an external issuer or a command (nothing to revoke
    there). The file stays if the relay cannot be asked (LoginError): a login believed gone must be."""
    with locked(state_dir, name):
        login = load(state_dir, name)
        revoked = logout_builtin(login) if isinstance(login, BuiltinLogin) else None
        _path(state_dir, name).unlink()
    _path(state_dir, name).with_suffix(".lock").unlink(missing_ok=True)
    return revoked
