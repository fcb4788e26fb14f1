"""Users of the relay's built-in issuer, their one-time login codes and refresh credentials (the Store).

Records: ``users/<name>`` (uid, groups, created), ``login-codes/<sha256 of the code>`` and
``refresh-credentials/<sha256 of the credential>``. Codes and refresh credentials are random
secrets stored as SHA-256 hashes, like agent join tokens: a stolen database (SQLite file or etcd
snapshot) does not let anyone log in or mint tokens.

Every replica sees the same records: a code made at one replica is redeemed at another, and a
credential revoked at one is refused at all. The writes that spend or check a secret (redeeming a
code, using a credential) read the KV itself and commit only if the record is unchanged, so a code
works once however many replicas try it at the same moment, and a revoked credential mints nothing
even at a replica whose mirror has not heard of the revocation yet. The Dial path reads only the
mirror (``is_current``).

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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusterconnect import errors
from clusterconnect.errors import Unavailable
from clusterconnect.logs import get_logger
from clusterconnect.relay.storage.kv import Change, Versioned
from clusterconnect.relay.storage.store import Store
from clusterconnect.relay.user_identity import legacy
from clusterconnect.relay.user_identity.records import ATTEMPTS, decode, encode, read_through, update

log = get_logger(__name__)

USER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9._@]{0,62}[a-z0-9])?$")
GROUP_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9._@:/]{0,126}[A-Za-z0-9])?$")
LOGIN_CODE_TTL = 24 * 3600
DEFAULT_CREDENTIAL_LIFETIME = 30 * 24 * 3600

USERS = "users/"
CODES = "login-codes/"
CREDENTIALS = "refresh-credentials/"

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




def _text(document: dict[str, Any], field: str) -> str:
    value = document.get(field)
    return value if isinstance(value, str) else ""


def _number(document: dict[str, Any], field: str) -> int:
    value = document.get(field)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _user(name: str, stored: Versioned | None) -> UserRecord | None:
    document = decode(stored)
    if document is None or not _text(document, "uid"):
        return None  # absent, or not a record this version can read: nobody
    groups = document.get("groups")
    names = tuple(g for g in groups if isinstance(g, str)) if isinstance(groups, list) else ()
    return UserRecord(name, names, _number(document, "created_unix"), 0, _text(document, "uid"))


def _info(document: dict[str, Any]) -> CredentialInfo:
    return CredentialInfo(_text(document, "id"), _text(document, "device"), _number(document, "created_unix"),
                          _number(document, "last_used_unix"), _number(document, "expires_unix"))


_NOT_VALID = ("refresh credential is not valid (revoked, user removed or never logged in); "
              "log in again with `clusterconnect login --code`")


class UserStore:
    def __init__(self, store: Store, code_ttl: int = LOGIN_CODE_TTL, clock: Callable[[], float] = time.time,
                 credential_lifetime: int = DEFAULT_CREDENTIAL_LIFETIME) -> None:
        if credential_lifetime < 1:
            raise ValueError("refresh credential lifetime must be at least 1 second")
        self.store = store
        self.code_ttl = code_ttl
        self.credential_lifetime = credential_lifetime
        self._clock = clock  # tests pass their own to expire login codes and credentials without waiting

    @classmethod
    async def open(cls, store: Store, legacy_db: Path | None = None, **options: Any) -> UserStore:
        """The store, after importing the users, codes and credentials of an earlier version's tables."""
        users = cls(store, **options)
        await users._import(legacy_db)
        return users

    async def _import(self, db: Path | None) -> None:
        """Rows of earlier versions, with what this one relies on: a uid per user, and an id, owner uid
        and expiry (a full lifetime from now, so no login ends at the upgrade) per credential."""
        tables = legacy.pending(self.store, db, "users", "user_login_codes", "user_credentials")
        if not tables:
            return
        expires = int(self._clock()) + self.credential_lifetime
        put: dict[str, bytes] = {}
        uids: dict[str, str] = {}
        for row in tables.get("users", []):
            uids[row["name"]] = uid = row.get("uid") or _new_id()
            put[USERS + row["name"]] = encode({"uid": uid, "created_unix": int(row["created_unix"]),
                                               "groups": [g for g in (row["groups"] or "").split("\n") if g]})
        for row in tables.get("user_login_codes", []):
            if row["user"] in uids:
                put[CODES + row["code_sha256"]] = encode(
                    {"user": row["user"], "uid": uids[row["user"]], "expires_unix": int(row["expires_unix"] or 0)})
        for row in tables.get("user_credentials", []):
            uid = uids.get(row["user"], "")
            if not uid or row.get("user_uid", uid) not in ("", uid):
                continue  # of a user removed since (earlier versions refused these too)
            put[CREDENTIALS + row["credential_sha256"]] = encode({
                "id": row.get("id") or _new_id(), "user": row["user"], "user_uid": uid, "device": row["device"],
                "created_unix": int(row["created_unix"]), "last_used_unix": int(row["last_used_unix"] or 0),
                "expires_unix": int(row.get("expires_unix") or 0) or expires})
        if await legacy.import_once(self.store, list(tables), put):
            log.info("users of an earlier version imported", users=len(uids))

    def _code(self, name: str, uid: str) -> tuple[str, int, str, bytes]:
        code = secrets.token_hex(24)  # hex: never starts with '-', so it is safe on a command line
        expires = int(self._clock()) + self.code_ttl
        return code, expires, CODES + _digest(code), encode({"user": name, "uid": uid, "expires_unix": expires})

    async def add(self, name: str, groups: list[str]) -> tuple[UserRecord, str, int]:
        """Create a user; returns it, a one-time login code and the code's expiry."""
        validate_user(name)
        for group in groups:
            validate_group(group)
        groups = list(dict.fromkeys(groups))
        now = int(self._clock())
        uid = _new_id()
        code, expires, code_key, code_record = self._code(name, uid)
        record = encode({"uid": uid, "groups": groups, "created_unix": now})
        if not await self.store.commit(Change(expect={USERS + name: 0}, put={USERS + name: record,
                                                                            code_key: code_record})):
            raise UserExists(f"user {name} already exists")
        return UserRecord(name, tuple(groups), now, 0, uid), code, expires

    async def new_code(self, name: str) -> tuple[str, int]:
        now = int(self._clock())
        made: list[tuple[str, int]] = []

        def decide(current: Versioned | None) -> Change:
            user = _user(name, current)
            if user is None:
                raise NoSuchUser(f"user {name} does not exist")
            code, expires, key, record = self._code(name, user.uid)
            made[:] = [(code, expires)]
            expired = [k for k, v in self.store.list(CODES) if _number(decode(v) or {}, "expires_unix") < now]
            return Change(put={key: record}, delete=expired)

        await update(self.store, USERS + name, decide)
        return made[0]

    def _lookup(self, name: str) -> UserRecord | None:
        return _user(name, self.store.get(USERS + name))

    def get(self, name: str) -> UserRecord | None:
        user = self._lookup(name)
        return self._counted([user])[0] if user is not None else None

    def _counted(self, users: list[UserRecord]) -> list[UserRecord]:
        """``users`` with the number of their unexpired refresh credentials (one pass over them all)."""
        now = int(self._clock())
        counts: dict[str, int] = {}
        for _, stored in self.store.list(CREDENTIALS):
            document = decode(stored) or {}
            if _number(document, "expires_unix") >= now:
                counts[_text(document, "user_uid")] = counts.get(_text(document, "user_uid"), 0) + 1
        return [UserRecord(u.name, u.groups, u.created_unix, counts.get(u.uid, 0), u.uid) for u in users]

    def is_current(self, name: str, uid: str | None) -> bool:
        """Whether ``uid`` (from a token) is that of the user now called ``name``: False once the user was
        removed, and for a token of an earlier user of the same name. From the mirror (the Dial path)."""
        user = self._lookup(name)
        return user is not None and bool(uid) and secrets.compare_digest(user.uid, uid or "")

    def list(self) -> list[UserRecord]:
        found = [_user(key[len(USERS):], stored) for key, stored in self.store.list(USERS)]
        return self._counted([user for user in found if user is not None])

    async def remove(self, name: str) -> bool:
        """Remove the user with its login codes and refresh credentials, in one commit."""
        def decide(current: Versioned | None) -> Change | None:
            user = _user(name, current)
            if current is None:
                return None
            codes = [k for k, v in self.store.list(CODES) if _text(decode(v) or {}, "user") == name]
            logins = [k for k, v in self.store.list(CREDENTIALS)
                      if user is not None and _text(decode(v) or {}, "user_uid") == user.uid]
            return Change(delete=[USERS + name, *codes, *logins])

        removed, _ = await update(self.store, USERS + name, decide)
        return removed

    async def redeem_code(self, code: str, device: str) -> tuple[UserRecord, str]:
        """Consume a login code (once, at whichever replica); returns the user and a new refresh credential."""
        key = CODES + _digest(code)
        invalid = LoginCodeInvalid("login code is not valid (unknown, already used or expired)")
        found = await read_through(self.store, key)
        document = decode(found)
        if found is None or document is None or _number(document, "expires_unix") < int(self._clock()):
            raise invalid
        name = _text(document, "user")
        stored_user = await read_through(self.store, USERS + name)
        user = _user(name, stored_user)
        if stored_user is None or user is None or user.uid != _text(document, "uid"):
            raise invalid
        credential = secrets.token_urlsafe(32)
        now = int(self._clock())
        record = encode({"id": _new_id(), "user": name, "user_uid": user.uid, "device": device[:128],
                         "created_unix": now, "last_used_unix": 0, "expires_unix": now + self.credential_lifetime})
        # Both unchanged since read: the code not spent meanwhile (here or elsewhere), the user not replaced.
        spent = Change(expect={key: found.revision, USERS + name: stored_user.revision}, delete=[key],
                       put={CREDENTIALS + _digest(credential): record})
        if not await self.store.commit(spent):
            raise invalid
        return user, credential

    async def user_of_credential(self, credential: str) -> UserRecord:
        """The user a refresh credential belongs to; CredentialInvalid (saying why) if it is not valid now.
        Records its use, with the expectation that the credential is still there: one revoked at another
        replica a moment ago is refused here too (and with etcd unreachable, Unavailable: fail closed)."""
        key = CREDENTIALS + _digest(credential)
        for _ in range(ATTEMPTS):
            found = await read_through(self.store, key)
            document = decode(found)
            if found is None or document is None:
                raise CredentialInvalid(_NOT_VALID)
            now = int(self._clock())
            expires = _number(document, "expires_unix")
            if expires < now:
                raise CredentialInvalid(f"refresh credential expired at {_utc(expires)}; log in again with "
                                        "`clusterconnect login --code` (an admin gives you a code: `users code`)")
            name = _text(document, "user")
            user = self._lookup(name) or _user(name, await read_through(self.store, USERS + name))
            if user is None or user.uid != _text(document, "user_uid"):
                raise CredentialInvalid(_NOT_VALID)
            used = Change(expect={key: found.revision}, put={key: encode({**document, "last_used_unix": now})})
            if await self.store.commit(used):
                return user
        raise Unavailable("this refresh credential was used at several replicas at once; try again")

    def _credential(self, credential: str) -> tuple[str, dict[str, Any]] | None:
        key = CREDENTIALS + _digest(credential)
        document = decode(self.store.get(key))
        return (key, document) if document is not None else None

    def credentials(self, name: str) -> tuple[CredentialInfo, ...]:
        """The user's refresh credentials, expired ones included (until they are revoked)."""
        user = self._lookup(name)
        if user is None:
            raise NoSuchUser(f"user {name} does not exist")
        found = [_info(d) for d in (decode(v) for _, v in self.store.list(CREDENTIALS))
                 if d is not None and _text(d, "user_uid") == user.uid]
        return tuple(sorted(found, key=lambda c: (c.created_unix, c.id)))

    def credential_info(self, credential: str) -> CredentialInfo | None:
        found = self._credential(credential)
        return _info(found[1]) if found else None

    async def revoke_credential(self, name: str, credential_id: str) -> bool:
        """An admin revokes one of the user's credentials by its id; False if the user has none of that id."""
        user = self._lookup(name)
        if user is None:
            raise NoSuchUser(f"user {name} does not exist")
        keys = [k for k, v in self.store.list(CREDENTIALS) if (d := decode(v)) is not None
                and _text(d, "user_uid") == user.uid and _text(d, "id") == credential_id]
        return await self.store.delete(*keys)

    async def revoke_own(self, credential: str) -> str | None:
        """Its holder revokes a refresh credential (logout); returns the user's name, None if it was not valid."""
        key = CREDENTIALS + _digest(credential)
        document = decode(self.store.get(key) or await read_through(self.store, key))
        if document is None:
            return None
        await self.store.commit(Change(delete=[key]))
        return _text(document, "user")
