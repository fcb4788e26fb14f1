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
- A token of an issuer the relay knows is verified on every cluster, a passthrough one included: an
  invalid one is refused (UNAUTHENTICATED), a valid one makes the caller *verified*, and the
  connection is bound to that identity (docs/identity.md).
- An unknown cluster and a cluster that does not admit the caller get the same PERMISSION_DENIED.

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
        # Stores-branch adapter until this file moves onto the Store: clusters are no longer a table here,
        # so grants cannot cascade from it; a removed cluster's grants are deleted when the Store says so.
        self._db.execute("PRAGMA foreign_keys=OFF")
        clusters.store.subscribe("clusters/", self._forget_removed)
        legacy = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'cluster_access'").fetchone()
        if legacy:
            with transaction(self._db):
                for statement in _MIGRATE_CLUSTER_ACCESS:
                    self._db.execute(statement)

    def _forget_removed(self, _key: str, value: bytes | None) -> None:
        if value is not None:
            return
        uids = [record.uid for record in self.clusters.list()]
        self._db.execute(f"DELETE FROM cluster_grants WHERE cluster_uid NOT IN ({','.join('?' * len(uids))})", uids)

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
    """Decides whether a Dial with ``token`` may reach ``cluster`` (see the module doc), and whether an
    open connection's caller still may (``refusal_now``, after a revocation)."""

    def __init__(self, access: AccessStore, verifier: Verifier, users: UserStore, builtin_issuer: str) -> None:
        self.access = access
        self.verifier = verifier
        self.users = users
        self.builtin_issuer = builtin_issuer

    async def check(self, cluster: str, token: str) -> Decision:
        """The token is verified first, whatever the cluster, so that an unknown cluster and one that
        does not admit the caller get the same answer: nobody learns which clusters exist."""
        try:
            identity: Identity | None = await self.verifier.verify(token)
        except (UnknownIssuer, NotAJWT):
            identity = None  # not ours to interpret: only a passthrough cluster takes it
        except TokenError as exc:
            return Decision(False, grpc.StatusCode.UNAUTHENTICATED, f"the relay refused the token: {exc}")
        if identity is not None and self._removed(identity):
            return Decision(False, grpc.StatusCode.PERMISSION_DENIED,
                            f"user {identity.username} was removed from the relay (a token of a removed user, "
                            "even one added again under that name, is refused; log in again)", identity)
        if self.access.clusters.get(cluster) is not None and self._admits(cluster, identity):
            return Decision(True, identity=identity)
        if identity is None:
            message = (f"cluster {cluster} is not registered at the relay, or it admits only users on its access "
                       "list, and the relay does not know this token's issuer (log in with `clusterconnect login`)")
        else:
            message = (f'user "{identity.username}" may not reach cluster {cluster} (it is not registered at the '
                       "relay, or the user is not on its access list; an admin can run `clusterconnect clusters "
                       "grant`)")
        return Decision(False, grpc.StatusCode.PERMISSION_DENIED, message, identity)

    def refusal_now(self, cluster: str, caller: Identity | None) -> str | None:
        """Why an open connection of ``caller`` to ``cluster`` may no longer be open; None if it still may."""
        if caller is not None and self._removed(caller):
            return f"user {caller.username} was removed from the relay"
        if not self._admits(cluster, caller):
            return f"access to cluster {cluster} was revoked at the relay"
        return None

    def expires_unix(self, caller: Identity | None) -> float | None:
        """When a connection opened with ``caller``'s token must end: the token's expiry plus the
        verifier's clock-skew leeway (the last moment the token would still verify)."""
        if caller is None or caller.expires_unix is None:
            return None
        return caller.expires_unix + self.verifier.leeway

    def _removed(self, identity: Identity) -> bool:
        return identity.issuer == self.builtin_issuer and not self.users.is_current(identity.username, identity.uid)

    def _admits(self, cluster: str, identity: Identity | None) -> bool:
        entries = self.access.entries(cluster)
        if not entries:
            return True  # passthrough cluster: the cluster authenticates
        if identity is None:
            return False
        users = {e.name for e in entries if e.kind == "user"}
        groups = {e.name for e in entries if e.kind == "group"}
        return identity.username in users or bool(groups.intersection(identity.groups))
