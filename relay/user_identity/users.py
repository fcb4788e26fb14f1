"""Users of the relay's built-in issuer, their one-time login codes and refresh credentials (SQLite).

Kept in the relay's ``relay.db`` in tables of their own. Codes and refresh credentials are random
256-bit secrets stored as SHA-256 hashes, like agent join tokens: a stolen database does not let
anyone log in or mint tokens.

Each user gets a random ``uid`` when added; access tokens carry it (claim ``uid``) and refresh
credentials belong to it, so a user removed and added again under the same name is a new identity:
tokens and logins of the old one stay refused, and so do its group memberships.

Refresh credentials expire (``--refresh-credential-lifetime``, default 30 days); each has a public
``id`` by which an admin lists and revokes it, and its holder can revoke it (``clusterconnect logout``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clusterconnect import errors
from clusterconnect.relay.storage.sqlite import add_column, open_db, transaction

USER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9._@]{0,62}[a-z0-9])?$")
GROUP_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9._@:/]{0,126}[A-Za-z0-9])?$")
LOGIN_CODE_TTL = 24 * 3600
DEFAULT_CREDENTIAL_LIFETIME = 30 * 24 * 3600

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    groups TEXT NOT NULL DEFAULT '',
    created_unix INTEGER NOT NULL,
    uid TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS user_login_codes (
    code_sha256 TEXT PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    expires_unix INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS user_credentials (
    credential_sha256 TEXT PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    device TEXT NOT NULL DEFAULT '',
    created_unix INTEGER NOT NULL,
    last_used_unix INTEGER NOT NULL DEFAULT 0,
    id TEXT NOT NULL DEFAULT '',
    user_uid TEXT NOT NULL DEFAULT '',
    expires_unix INTEGER NOT NULL DEFAULT 0
);
"""
# Columns earlier versions did not have; their rows are filled in by UserStore._migrate.
_ADDED_COLUMNS = (
    ("users", "uid", "TEXT NOT NULL DEFAULT ''"),
    ("user_credentials", "id", "TEXT NOT NULL DEFAULT ''"),
    ("user_credentials", "user_uid", "TEXT NOT NULL DEFAULT ''"),
    ("user_credentials", "expires_unix", "INTEGER NOT NULL DEFAULT 0"),
)
_INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS users_uid ON users (uid);
CREATE UNIQUE INDEX IF NOT EXISTS user_credentials_id ON user_credentials (id);
"""


class UserError(errors.ClusterConnectError):
    """A refused user operation; the message is safe to show. Its subclass says how it is reported."""


class InvalidUserInput(UserError, errors.InvalidInput):
    """A user or group name that can never be valid."""


class UserExists(UserError, errors.AlreadyExists):
    pass


class NoSuchUser(UserError, errors.NotFound):
    pass


class LoginCodeInvalid(UserError, errors.Unauthenticated):
    """A login code that is unknown, already used or expired."""


class CredentialInvalid(UserError, errors.Unauthenticated):
    """A refresh credential that is unknown, revoked, expired, or of a user who was removed."""


@dataclass(frozen=True)
class UserRecord:
    name: str
    groups: tuple[str, ...]
    created_unix: int
    credentials: int = 0
    uid: str = ""  # random, per user: a user added again under the same name gets a new one


@dataclass(frozen=True)
class CredentialInfo:
    """What an admin sees of a refresh credential (never the secret or its hash)."""

    id: str
    device: str
    created_unix: int
    last_used_unix: int
    expires_unix: int


def _new_id() -> str:
    return secrets.token_hex(8)


def _utc(unix: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(unix))


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def validate_user(name: str) -> None:
    if name.startswith("system") or not USER_NAME.match(name):
        raise InvalidUserInput(
            f"invalid user name {name!r}: lower-case letters, digits, '-', '.', '_', '@' (at most 64), "
            "not starting with 'system'"
        )


def validate_group(group: str) -> None:
    if group.startswith("system:") or not GROUP_NAME.match(group):
        raise InvalidUserInput(f"invalid group name {group!r} (letters, digits, '-._@:/'; not system:*)")


class UserStore:
    def __init__(self, path: Path, code_ttl: int = LOGIN_CODE_TTL, clock: Callable[[], float] = time.time,
                 credential_lifetime: int = DEFAULT_CREDENTIAL_LIFETIME) -> None:
        if credential_lifetime < 1:
            raise ValueError("refresh credential lifetime must be at least 1 second")
        self._db = open_db(path, _SCHEMA)
        self.code_ttl = code_ttl
        self.credential_lifetime = credential_lifetime
        self._clock = clock  # tests pass their own to expire login codes and credentials without waiting
        self._migrate()

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        """Give rows of an earlier version what this one relies on: a uid per user, and an id, owner uid
        and expiry (a full lifetime from now, so no login ends at the upgrade) per credential."""
        for table, column, declaration in _ADDED_COLUMNS:
            add_column(self._db, table, column, declaration)
        with transaction(self._db):
            for (name,) in self._db.execute("SELECT name FROM users WHERE uid = ''").fetchall():
                self._db.execute("UPDATE users SET uid = ? WHERE name = ?", (_new_id(), name))
            expires = int(self._clock()) + self.credential_lifetime
            unnamed = self._db.execute("SELECT credential_sha256 FROM user_credentials WHERE id = ''").fetchall()
            for (digest,) in unnamed:
                self._db.execute(
                    "UPDATE user_credentials SET id = ?, expires_unix = ?,"
                    " user_uid = (SELECT uid FROM users WHERE name = user_credentials.user)"
                    " WHERE credential_sha256 = ?", (_new_id(), expires, digest))
        self._db.executescript(_INDEXES)

    def _record(self, row: tuple[str, str, int, str]) -> UserRecord:
        name, groups, created, uid = row
        count = self._db.execute("SELECT COUNT(*) FROM user_credentials WHERE user_uid = ? AND expires_unix >= ?",
                                 (uid, int(self._clock()))).fetchone()[0]
        return UserRecord(name, tuple(g for g in groups.split("\n") if g), created, count, uid)

    def add(self, name: str, groups: list[str]) -> tuple[UserRecord, str, int]:
        """Create a user; returns it, a one-time login code and the code's expiry."""
        validate_user(name)
        for group in groups:
            validate_group(group)
        groups = list(dict.fromkeys(groups))
        now = int(self._clock())
        uid = _new_id()
        try:
            self._db.execute("INSERT INTO users (name, groups, created_unix, uid) VALUES (?, ?, ?, ?)",
                             (name, "\n".join(groups), now, uid))
        except sqlite3.IntegrityError:
            raise UserExists(f"user {name} already exists") from None
        code, expires = self.new_code(name)
        return UserRecord(name, tuple(groups), now, 0, uid), code, expires

    def new_code(self, name: str) -> tuple[str, int]:
        if self.get(name) is None:
            raise NoSuchUser(f"user {name} does not exist")
        code = secrets.token_hex(24)  # hex: never starts with '-', so it is safe on a command line
        expires = int(self._clock()) + self.code_ttl
        self._db.execute("DELETE FROM user_login_codes WHERE expires_unix < ?", (int(self._clock()),))
        self._db.execute("INSERT INTO user_login_codes (code_sha256, user, expires_unix) VALUES (?, ?, ?)",
                         (_digest(code), name, expires))
        return code, expires

    def get(self, name: str) -> UserRecord | None:
        row = self._db.execute("SELECT name, groups, created_unix, uid FROM users WHERE name = ?", (name,)).fetchone()
        return self._record(row) if row else None

    def is_current(self, name: str, uid: str | None) -> bool:
        """Whether ``uid`` (from a token) is that of the user now called ``name``: False once the user was
        removed, and for a token of an earlier user of the same name."""
        user = self.get(name)
        return user is not None and bool(uid) and secrets.compare_digest(user.uid, uid or "")

    def list(self) -> list[UserRecord]:
        rows = self._db.execute("SELECT name, groups, created_unix, uid FROM users ORDER BY name").fetchall()
        return [self._record(row) for row in rows]

    def remove(self, name: str) -> bool:
        with transaction(self._db):
            self._db.execute("DELETE FROM user_login_codes WHERE user = ?", (name,))
            self._db.execute("DELETE FROM user_credentials WHERE user = ?", (name,))
            return self._db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0

    def redeem_code(self, code: str, device: str) -> tuple[UserRecord, str]:
        """Consume a login code (once); returns the user and a new refresh credential."""
        digest = _digest(code)
        now = int(self._clock())
        with transaction(self._db):
            row = self._db.execute(
                "DELETE FROM user_login_codes WHERE code_sha256 = ? RETURNING user, expires_unix", (digest,)
            ).fetchone()
            if row is None or row[1] < now:
                raise LoginCodeInvalid("login code is not valid (unknown, already used or expired)")
            credential = secrets.token_urlsafe(32)
            self._db.execute(
                "INSERT INTO user_credentials (credential_sha256, user, device, created_unix, id, user_uid,"
                " expires_unix) SELECT ?, name, ?, ?, ?, uid, ? FROM users WHERE name = ?",
                (_digest(credential), device[:128], now, _new_id(), now + self.credential_lifetime, row[0]),
            )
        user = self.get(row[0])
        assert user is not None  # the code's row references the user: both were there in the transaction
        return user, credential

    def user_of_credential(self, credential: str) -> UserRecord:
        """The user a refresh credential belongs to; CredentialInvalid (saying why) if it is not valid now."""
        digest = _digest(credential)
        row = self._db.execute(
            "SELECT c.user, c.user_uid, c.expires_unix FROM user_credentials c JOIN users u ON u.uid = c.user_uid"
            " WHERE c.credential_sha256 = ?", (digest,)).fetchone()
        if row is None:
            raise CredentialInvalid("refresh credential is not valid (revoked, user removed or never logged in); "
                                    "log in again with `clusterconnect login --code`")
        name, _, expires = row
        now = int(self._clock())
        if expires < now:
            raise CredentialInvalid(f"refresh credential expired at {_utc(expires)}; log in again with "
                                    "`clusterconnect login --code` (an admin gives you a code: `users code`)")
        self._db.execute("UPDATE user_credentials SET last_used_unix = ? WHERE credential_sha256 = ?", (now, digest))
        user = self.get(name)
        if user is None:
            raise CredentialInvalid("refresh credential is not valid: its user was removed")
        return user

    def credentials(self, name: str) -> tuple[CredentialInfo, ...]:
        """The user's refresh credentials, expired ones included (until they are revoked)."""
        user = self.get(name)
        if user is None:
            raise NoSuchUser(f"user {name} does not exist")
        rows = self._db.execute(
            "SELECT id, device, created_unix, last_used_unix, expires_unix FROM user_credentials"
            " WHERE user_uid = ? ORDER BY created_unix, id", (user.uid,)).fetchall()
        return tuple(CredentialInfo(*row) for row in rows)

    def credential_info(self, credential: str) -> CredentialInfo | None:
        row = self._db.execute("SELECT id, device, created_unix, last_used_unix, expires_unix FROM user_credentials"
                               " WHERE credential_sha256 = ?", (_digest(credential),)).fetchone()
        return CredentialInfo(*row) if row else None

    def revoke_credential(self, name: str, credential_id: str) -> bool:
        """An admin revokes one of the user's credentials by its id; False if the user has none of that id."""
        user = self.get(name)
        if user is None:
            raise NoSuchUser(f"user {name} does not exist")
        return self._db.execute("DELETE FROM user_credentials WHERE user_uid = ? AND id = ?",
                                (user.uid, credential_id)).rowcount > 0

    def revoke_own(self, credential: str) -> str | None:
        """Its holder revokes a refresh credential (logout); returns the user's name, None if it was not valid."""
        row = self._db.execute("DELETE FROM user_credentials WHERE credential_sha256 = ? RETURNING user",
                               (_digest(credential),)).fetchone()
        return str(row[0]) if row else None
