"""Who may reach which cluster: per-cluster access lists, checked when a client Dials.

The rule (docs/identity.md):

- A cluster with an **empty** access list is a *passthrough* cluster: a Dial needs a bearer token,
  which the relay does not interpret; the cluster's auth proxy and apiserver authenticate every
  request. This is how ServiceAccount tokens reach a cluster.
- A cluster with a **non-empty** access list admits only a caller whose token the relay verifies
  (``clusterconnect.oidc.Verifier``, the auth proxy's code: the built-in issuer plus any issuer of
  ``--authentication-config``) and whose mapped user name, or one of whose groups, is on the list.
  Anyone else is refused with PERMISSION_DENIED (an invalid token of a trusted issuer with
  UNAUTHENTICATED) before anything is sent toward the cluster.
- A built-in user removed with ``users remove`` is refused at once, even with an unexpired token, and
  so is a token of an earlier user of the same name (its ``uid`` claim is not the current user's).

Grants are keyed by the cluster's ``uid`` (unique per registration) and deleted with the cluster,
so a cluster registered again under the same name starts with an empty list, even within the same second.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import grpc

from clusterconnect import errors
from clusterconnect.oidc import Identity, NotAJWT, TokenError, UnknownIssuer, Verifier
from clusterconnect.relay.storage.clusters import ClusterStore
from clusterconnect.relay.storage.sqlite import open_db, transaction
from clusterconnect.relay.user_identity.users import UserStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cluster_grants (
    cluster_uid TEXT NOT NULL REFERENCES clusters (uid) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('user', 'group')),
    name TEXT NOT NULL,
    PRIMARY KEY (cluster_uid, kind, name)
);
"""
# Earlier versions kept grants in cluster_access, keyed by (name, created_unix): moved once, and only
# those of the registration that still exists.
_MIGRATE_CLUSTER_ACCESS = (
    "INSERT OR IGNORE INTO cluster_grants (cluster_uid, kind, name)"
    " SELECT c.uid, a.kind, a.name FROM cluster_access a"
    " JOIN clusters c ON c.name = a.cluster AND c.created_unix = a.cluster_created_unix",
    "DROP TABLE cluster_access",
)


class AccessError(errors.ClusterConnectError):
    """A refused change of an access list; its subclass says how it is reported."""


class ClusterNotRegistered(AccessError, errors.NotFound):
    pass


class InvalidEntry(AccessError, errors.InvalidInput):
    """An access list entry that is neither a user nor a group name."""


@dataclass(frozen=True)
class Entry:
    kind: str  # "user" or "group"
    name: str


@dataclass(frozen=True)
class Decision:
    allowed: bool
    code: grpc.StatusCode | None = None  # when refused: UNAUTHENTICATED or PERMISSION_DENIED
    message: str = ""
    identity: Identity | None = None


class AccessStore:
    def __init__(self, path: Path, clusters: ClusterStore) -> None:
        self.clusters = clusters  # first: its table holds the uids the grants refer to
        self._db = open_db(path, _SCHEMA)
        legacy = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'cluster_access'").fetchone()
        if legacy:
            with transaction(self._db):
                for statement in _MIGRATE_CLUSTER_ACCESS:
                    self._db.execute(statement)

    def close(self) -> None:
        self._db.close()

    def _uid(self, cluster: str) -> str:
        record = self.clusters.get(cluster)
        if record is None:
            raise ClusterNotRegistered(f"cluster {cluster} is not registered")
        return record.uid

    def grant(self, cluster: str, entry: Entry) -> list[Entry]:
        if entry.kind not in ("user", "group") or not entry.name or len(entry.name) > 256:
            raise InvalidEntry("grant a --user NAME or a --group NAME")
        try:
            self._db.execute("INSERT OR IGNORE INTO cluster_grants (cluster_uid, kind, name) VALUES (?, ?, ?)",
                             (self._uid(cluster), entry.kind, entry.name))
        except sqlite3.IntegrityError:  # the foreign key: removed since _uid read it
            raise ClusterNotRegistered(f"cluster {cluster} is not registered") from None
        return self.entries(cluster)

    def revoke(self, cluster: str, entry: Entry) -> list[Entry]:
        self._db.execute("DELETE FROM cluster_grants WHERE cluster_uid = ? AND kind = ? AND name = ?",
                         (self._uid(cluster), entry.kind, entry.name))
        return self.entries(cluster)

    def entries(self, cluster: str) -> list[Entry]:
        record = self.clusters.get(cluster)
        if record is None:
            return []
        rows = self._db.execute("SELECT kind, name FROM cluster_grants WHERE cluster_uid = ? ORDER BY kind DESC, name",
                                (record.uid,)).fetchall()
        return [Entry(kind, name) for kind, name in rows]


class DialAuthorizer:
    """Decides whether a Dial with ``token`` may reach ``cluster`` (see the module doc)."""

    def __init__(self, access: AccessStore, verifier: Verifier, users: UserStore, builtin_issuer: str) -> None:
        self.access = access
        self.verifier = verifier
        self.users = users
        self.builtin_issuer = builtin_issuer

    async def check(self, cluster: str, token: str) -> Decision:
        entries = self.access.entries(cluster)
        if not entries:
            return Decision(True)  # passthrough cluster: the cluster authenticates
        try:
            identity = await self.verifier.verify(token)
        except (UnknownIssuer, NotAJWT):
            return Decision(False, grpc.StatusCode.PERMISSION_DENIED,
                            f"cluster {cluster} admits only users on its access list, and the relay does not "
                            "know this token's issuer (log in with `clusterconnect login`)")
        except TokenError as exc:
            return Decision(False, grpc.StatusCode.UNAUTHENTICATED, f"the relay refused the token: {exc}")
        if identity.issuer == self.builtin_issuer and not self.users.is_current(identity.username, identity.uid):
            return Decision(False, grpc.StatusCode.PERMISSION_DENIED,
                            f"user {identity.username} was removed from the relay (a token of a removed user, "
                            "even one added again under that name, is refused; log in again)")
        users = {e.name for e in entries if e.kind == "user"}
        groups = {e.name for e in entries if e.kind == "group"}
        if identity.username in users or groups.intersection(identity.groups):
            return Decision(True, identity=identity)
        return Decision(False, grpc.StatusCode.PERMISSION_DENIED,
                        f'user "{identity.username}" may not reach cluster {cluster} (not on its access list at '
                        "the relay; an admin can run `clusterconnect clusters grant`)", identity)
