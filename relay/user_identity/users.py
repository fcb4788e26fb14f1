"""Users of the relay's built-in issuer, their one-time login codes and refresh credentials (SQLite).

Kept in the relay's ``relay.db`` in tables of their own. Codes and refresh credentials are random
256-bit secrets stored as SHA-256 hashes, like agent join tokens: a stolen database does not let
anyone log in or mint tokens.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from clusterconnect import errors
from clusterconnect.relay.storage.sqlite import open_db

USER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9._@]{0,62}[a-z0-9])?$")
GROUP_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9._@:/]{0,126}[A-Za-z0-9])?$")
LOGIN_CODE_TTL = 24 * 3600

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    groups TEXT NOT NULL DEFAULT '',
    created_unix INTEGER NOT NULL
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
    last_used_unix INTEGER NOT NULL DEFAULT 0
);
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


@dataclass(frozen=True)
class UserRecord:
    name: str
    groups: tuple[str, ...]
    created_unix: int
    credentials: int = 0


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
    def __init__(self, path: Path, code_ttl: int = LOGIN_CODE_TTL, clock: Callable[[], float] = time.time) -> None:
        self._db = open_db(path, _SCHEMA)
        self.code_ttl = code_ttl
        self._clock = clock  # tests pass their own to expire login codes without waiting

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _record(self, row: tuple[str, str, int]) -> UserRecord:
        name, groups, created = row
        count = self._db.execute("SELECT COUNT(*) FROM user_credentials WHERE user = ?", (name,)).fetchone()[0]
        return UserRecord(name, tuple(g for g in groups.split("\n") if g), created, count)

    def add(self, name: str, groups: list[str]) -> tuple[UserRecord, str, int]:
        """Create a user; returns it, a one-time login code and the code's expiry."""
        validate_user(name)
        for group in groups:
            validate_group(group)
        groups = list(dict.fromkeys(groups))
        now = int(self._clock())
        try:
            self._db.execute("INSERT INTO users (name, groups, created_unix) VALUES (?, ?, ?)",
                             (name, "\n".join(groups), now))
        except sqlite3.IntegrityError:
            raise UserExists(f"user {name} already exists") from None
        code, expires = self.new_code(name)
        return UserRecord(name, tuple(groups), now), code, expires

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
        row = self._db.execute("SELECT name, groups, created_unix FROM users WHERE name = ?", (name,)).fetchone()
        return self._record(row) if row else None

    def list(self) -> list[UserRecord]:
        rows = self._db.execute("SELECT name, groups, created_unix FROM users ORDER BY name").fetchall()
        return [self._record(row) for row in rows]

    def remove(self, name: str) -> bool:
        with self._transaction():
            self._db.execute("DELETE FROM user_login_codes WHERE user = ?", (name,))
            self._db.execute("DELETE FROM user_credentials WHERE user = ?", (name,))
            return self._db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0

    def redeem_code(self, code: str, device: str) -> tuple[UserRecord, str]:
        """Consume a login code (once); returns the user and a new refresh credential."""
        digest = _digest(code)
        now = int(self._clock())
        with self._transaction():
            row = self._db.execute(
                "DELETE FROM user_login_codes WHERE code_sha256 = ? RETURNING user, expires_unix", (digest,)
            ).fetchone()
            if row is None or row[1] < now:
                raise LoginCodeInvalid("login code is not valid (unknown, already used or expired)")
            credential = secrets.token_urlsafe(32)
            self._db.execute(
                "INSERT INTO user_credentials (credential_sha256, user, device, created_unix) VALUES (?, ?, ?, ?)",
                (_digest(credential), row[0], device[:128], now),
            )
        user = self.get(row[0])
        assert user is not None
        return user, credential

    def user_of_credential(self, credential: str) -> UserRecord | None:
        digest = _digest(credential)
        row = self._db.execute("SELECT user FROM user_credentials WHERE credential_sha256 = ?", (digest,)).fetchone()
        if row is None:
            return None
        self._db.execute("UPDATE user_credentials SET last_used_unix = ? WHERE credential_sha256 = ?",
                         (int(self._clock()), digest))
        return self.get(row[0])
