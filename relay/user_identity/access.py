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

Grants are keyed by the cluster's ``uid`` (unique per registration): ``cluster-grants/<uid>/<kind>/<name>``
in the Store, deleted with the cluster (``ClusterStore.remove``, one commit), so a cluster registered
again under the same name starts with an empty list, even within the same second. The Dial path reads
them from an index by uid that the Store's changes keep current (whichever replica made them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from clusterconnect import errors
from clusterconnect.logs import get_logger
from clusterconnect.oidc import Identity, NotAJWT, TokenError, UnknownIssuer, Verifier
from clusterconnect.relay.storage.clusters import ClusterStore
from clusterconnect.relay.storage.kv import Change
from clusterconnect.relay.storage.store import Store
from clusterconnect.relay.user_identity import legacy
from clusterconnect.relay.user_identity.records import encode
from clusterconnect.relay.user_identity.users import UserStore

log = get_logger(__name__)

GRANTS = "cluster-grants/"
KINDS = ("user", "group")
# A cluster's record (relay/storage/clusters.py): a grant is written only while it is unchanged.
CLUSTERS = "clusters/"


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


def _entry_of(key: str) -> tuple[str, Entry] | None:
    """(cluster uid, entry) of a grant's key; None for a key this version does not read."""
    uid, _, rest = key[len(GRANTS):].partition("/")
    kind, _, name = rest.partition("/")
    return (uid, Entry(kind, name)) if uid and kind in KINDS and name else None


def _ordered(entries: set[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: (e.kind != "user", e.name))  # users first, as `clusters access` shows


class AccessStore:
    def __init__(self, store: Store, clusters: ClusterStore) -> None:
        self.store = store
        self.clusters = clusters
        # cluster uid -> its entries; fed by the Store's changes, so a Dial never scans the store.
        self._by_uid: dict[str, set[Entry]] = {}
        store.subscribe(GRANTS, self._changed)
        for key, _ in store.list(GRANTS):
            self._changed(key, b"")

    @classmethod
    async def open(cls, store: Store, clusters: ClusterStore, legacy_db: Path | None = None) -> AccessStore:
        """The access lists, after importing an earlier version's tables (``cluster_grants`` keyed by the
        cluster's uid; the older ``cluster_access`` by name and creation time: only the grants of the
        registration that still exists)."""
        access = cls(store, clusters)
        tables = legacy.pending(store, legacy_db, "cluster_grants", "cluster_access")
        put: dict[str, bytes] = {}
        for row in tables.get("cluster_grants", []):
            put[access._key(row["cluster_uid"], Entry(row["kind"], row["name"]))] = b"{}"
        for row in tables.get("cluster_access", []):
            record = clusters.get(row["cluster"])
            if record is not None and record.uid and record.created_unix == row["cluster_created_unix"]:
                put[access._key(record.uid, Entry(row["kind"], row["name"]))] = b"{}"
        if tables and await legacy.import_once(store, list(tables), put):
            log.info("access lists of an earlier version imported", grants=len(put))
        return access

    def _changed(self, key: str, value: bytes | None) -> None:
        found = _entry_of(key)
        if found is None:
            return
        uid, entry = found
        if value is not None:
            self._by_uid.setdefault(uid, set()).add(entry)
        elif uid in self._by_uid:
            self._by_uid[uid].discard(entry)
            if not self._by_uid[uid]:
                del self._by_uid[uid]

    @staticmethod
    def _key(uid: str, entry: Entry) -> str:
        return f"{GRANTS}{uid}/{entry.kind}/{entry.name}"

    def _uid(self, cluster: str) -> str:
        record = self.clusters.get(cluster)
        if record is None:
            raise ClusterNotRegistered(f"cluster {cluster} is not registered")
        return record.uid

    async def grant(self, cluster: str, entry: Entry) -> list[Entry]:
        if entry.kind not in KINDS or not entry.name or len(entry.name) > 256:
            raise InvalidEntry("grant a --user NAME or a --group NAME")
        key = self._key(self._uid(cluster), entry)
        if self.store.get(key) is None:
            # Written only while the cluster's registration is the one read: a grant racing with
            # `clusters remove` (at any replica) fails instead of outliving the cluster.
            registration = self.store.get(CLUSTERS + cluster)
            expect = {CLUSTERS + cluster: registration.revision} if registration is not None else {}
            if not await self.store.commit(Change(expect=expect, put={key: encode({})})):
                raise ClusterNotRegistered(f"cluster {cluster} is not registered")
        return self.entries(cluster)

    async def revoke(self, cluster: str, entry: Entry) -> list[Entry]:
        await self.store.delete(self._key(self._uid(cluster), entry))
        return self.entries(cluster)

    def entries(self, cluster: str) -> list[Entry]:
        record = self.clusters.get(cluster)
        return _ordered(self._by_uid.get(record.uid, set())) if record is not None else []


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

    def refusal_now(self, cluster: str, caller: Identity | None,
                    entries: list[Entry] | None = None) -> str | None:
        """Why an open connection of ``caller`` to ``cluster`` may no longer be open; None if it still may.
        ``entries``: the cluster's access list, when the caller read it already."""
        if caller is not None and self._removed(caller):
            return f"user {caller.username} was removed from the relay"
        if self.access.clusters.get(cluster) is None:
            return f"cluster {cluster} was removed from the relay"
        if not _admitted(self.access.entries(cluster) if entries is None else entries, caller):
            return f"access to cluster {cluster} was revoked at the relay"
        return None

    def refusals(self) -> Callable[[str, Identity | None], str | None]:
        """``refusal_now`` reading each cluster's access list once, for a recheck of many connections."""
        lists: dict[str, list[Entry]] = {}

        def refusal(cluster: str, caller: Identity | None) -> str | None:
            if cluster not in lists:
                lists[cluster] = self.access.entries(cluster)
            return self.refusal_now(cluster, caller, lists[cluster])
        return refusal

    def expires_unix(self, caller: Identity | None) -> float | None:
        """When a connection opened with ``caller``'s token must end: the token's expiry plus the
        verifier's clock-skew leeway (the last moment the token would still verify)."""
        if caller is None or caller.expires_unix is None:
            return None
        return caller.expires_unix + self.verifier.leeway

    def _removed(self, identity: Identity) -> bool:
        return identity.issuer == self.builtin_issuer and not self.users.is_current(identity.username, identity.uid)

    def _admits(self, cluster: str, identity: Identity | None) -> bool:
        return _admitted(self.access.entries(cluster), identity)


def _admitted(entries: list[Entry], identity: Identity | None) -> bool:
    if not entries:
        return True  # passthrough cluster: the cluster authenticates
    if identity is None:
        return False
    users = {e.name for e in entries if e.kind == "user"}
    groups = {e.name for e in entries if e.kind == "group"}
    return identity.username in users or bool(groups.intersection(identity.groups))
