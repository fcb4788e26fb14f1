"""The relay's cluster registry, on the Store (relay/storage/store.py): SQLite or etcd.

One record per cluster, ``clusters/<name>`` → {"uid", "created_unix", "last_seen_unix",
"agent_version", "kubernetes_version"}. Agents authenticate with client certificates; join tokens
and certificate serials are relay/agent_identity/enrollment.py's records.

Each registration gets a random ``uid``, never reused: what belongs to one registration (its access
list, ``cluster-grants/<uid>/...``, relay/user_identity/access.py) is keyed by it and deleted with it
in the same commit, so a cluster registered again under the same name, even within the same second,
starts with nothing of the old one.

Reads are from the Store's memory (the Dial path looks a cluster up on every connection); writes
are async and visible on return. ``last_seen_unix`` and the versions are written once per agent
session (at hello), never per heartbeat: with etcd, 10,000 agents must not mean 1,000 writes a second.
And not at the hello itself: ``note_seen`` queues them and ``record_seen_forever`` writes what queued
in one Txn per SEEN_BATCH clusters every SEEN_FLUSH_SECONDS. With one write per hello (awaited before
the agent was welcomed), 10,000 agents connecting to 3 replicas in 44 s overloaded etcd on this 2-core
machine until a replica could not renew its lease, in 2 of 3 runs (docs/replicas.md, Figures).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from clusterconnect import errors
from clusterconnect.logs import get_logger
from clusterconnect.relay.storage.kv import Change, SqliteKV
from clusterconnect.relay.storage.sqlite import add_column, transaction
from clusterconnect.relay.storage.store import Store, encode

log = get_logger(__name__)

SEEN_FLUSH_SECONDS = 0.5
# A compare and a put per cluster: 128 operations, etcd's default --max-txn-ops.
SEEN_BATCH = 64

CLUSTER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
PREFIX = "clusters/"
GRANTS_PREFIX = "cluster-grants/"
# The table of versions before the Store; imported once (Store.import_once), then left alone.
LEGACY_TABLE = "clusters"


class InvalidName(errors.InvalidInput):
    """Not a cluster name (DNS label rules)."""


class AlreadyExists(errors.AlreadyExists):
    """A cluster of that name is registered already."""


@dataclass(frozen=True)
class ClusterRecord:
    name: str
    created_unix: int
    last_seen_unix: int
    agent_version: str
    kubernetes_version: str
    uid: str = ""  # unique per registration


def _new_uid() -> str:
    return secrets.token_hex(16)


def validate_name(name: str) -> None:
    if not CLUSTER_NAME.match(name):
        raise InvalidName(
            f"invalid cluster name {name!r}: use lower-case letters, digits and '-', at most 63 characters"
        )


def grants_prefix(uid: str) -> str:
    """Where the access list of one registration lives (deleted with the cluster)."""
    return f"{GRANTS_PREFIX}{uid}/"


def _value(record: ClusterRecord) -> bytes:
    return encode({"uid": record.uid, "created_unix": record.created_unix, "last_seen_unix": record.last_seen_unix,
                   "agent_version": record.agent_version, "kubernetes_version": record.kubernetes_version})


def _legacy_records(rows: list[dict[str, object]]) -> dict[str, bytes]:
    """Rows of the old ``clusters`` table as records; a row of a version before uids gets one now."""
    records = {}
    for row in rows:
        name = str(row["name"])
        records[PREFIX + name] = _value(ClusterRecord(
            name, int(str(row.get("created_unix") or 0)), int(str(row.get("last_seen_unix") or 0)),
            str(row.get("agent_version") or ""), str(row.get("kubernetes_version") or ""),
            str(row.get("uid") or "") or _new_uid(),
        ))
    return records


def _give_legacy_rows_uids(kv: SqliteKV) -> None:
    """Rows of a version before uids get theirs in the old table first, as that version's successor did:
    the old access lists there (cluster_access, by name) are matched to registrations by it."""
    if kv.legacy_rows(LEGACY_TABLE) is None:
        return
    add_column(kv.db, LEGACY_TABLE, "uid", "TEXT NOT NULL DEFAULT ''")
    with transaction(kv.db):
        for (name,) in kv.db.execute("SELECT name FROM clusters WHERE uid = ''").fetchall():
            kv.db.execute("UPDATE clusters SET uid = ? WHERE name = ?", (_new_uid(), name))


class ClusterStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._seen: dict[str, tuple[int, str, str, str]] = {}  # name -> (seen_unix, versions, registration uid)
        self._seen_queued = asyncio.Event()

    @classmethod
    async def open(cls, store: Store) -> ClusterStore:
        """The registry on ``store``; an earlier version's ``clusters`` rows are imported on the first start."""
        if isinstance(store.kv, SqliteKV) and store.get(f"meta/imported/{LEGACY_TABLE}") is None:
            _give_legacy_rows_uids(store.kv)
        imported = await store.import_once(LEGACY_TABLE, _legacy_records)
        if imported:
            log.info("clusters imported from the earlier table", clusters=imported)
        return cls(store)

    async def add(self, name: str) -> ClusterRecord:
        """Register a cluster (its agent joins with a token from relay/agent_identity/enrollment.py)."""
        validate_name(name)
        record = ClusterRecord(name, int(time.time()), 0, "", "", _new_uid())
        if not await self.store.create(PREFIX + name, _value(record)):
            raise AlreadyExists(f"cluster {name} already exists")
        return record

    async def remove(self, name: str) -> bool:
        """Unregister; the access list of this registration goes in the same commit."""
        current = self.store.get(PREFIX + name)
        record = self.get(name)
        if current is None or record is None:
            return False
        # Expect the revision read: a concurrent re-registration (a new uid) is not removed with the old grants.
        return await self.store.commit(Change(expect={PREFIX + name: current.revision}, delete=[PREFIX + name],
                                              delete_prefixes=[grants_prefix(record.uid)]))

    def get(self, name: str) -> ClusterRecord | None:
        document = self.store.get_json(PREFIX + name)
        if document is None:
            return None
        try:
            return ClusterRecord(name, int(document["created_unix"]), int(document.get("last_seen_unix", 0)),
                                 str(document.get("agent_version", "")), str(document.get("kubernetes_version", "")),
                                 str(document["uid"]))
        except (KeyError, TypeError, ValueError):
            log.warning("cluster record unreadable; ignored", cluster=name)
            return None

    def list(self) -> list[ClusterRecord]:
        records = (self.get(key[len(PREFIX):]) for key, _ in self.store.list(PREFIX))
        return [record for record in records if record is not None]

    def note_seen(self, name: str, seen_unix: int, agent_version: str, kubernetes_version: str) -> None:
        """Once per agent session (its hello): written soon by ``record_seen_forever``, the newest per cluster,
        into this registration's record only (not one of the same name registered again meanwhile)."""
        record = self.get(name)
        if record is not None:
            self._seen[name] = (seen_unix, agent_version, kubernetes_version, record.uid)
            self._seen_queued.set()

    async def record_seen_forever(self) -> None:
        """Write what ``note_seen`` queued, batched, until cancelled (a task of the relay's)."""
        while True:
            await self._seen_queued.wait()
            self._seen_queued.clear()
            queued, self._seen = list(self._seen.items()), {}
            for start in range(0, len(queued), SEEN_BATCH):
                await self.record_seen(queued[start:start + SEEN_BATCH])
            await asyncio.sleep(SEEN_FLUSH_SECONDS)  # what arrives meanwhile goes in the next batch

    async def record_seen(self, seen: Sequence[tuple[str, tuple[int, str, str, str]]]) -> None:
        """One commit for ``seen`` (cluster, (seen_unix, agent_version, kubernetes_version, uid)). A store that
        cannot be written (etcd unreachable) costs the record, never an agent's session: this replica
        keeps serving what it has."""
        change = Change()
        for name, (seen_unix, agent_version, kubernetes_version, uid) in seen:
            current, record = self.store.get(PREFIX + name), self.get(name)
            if current is None or record is None or record.uid != uid:
                continue
            # Only this registration's record: a cluster removed meanwhile is not written back.
            change.expect[PREFIX + name] = current.revision
            change.put[PREFIX + name] = _value(
                ClusterRecord(name, record.created_unix, seen_unix, agent_version, kubernetes_version, record.uid))
        if not change.put:
            return
        try:
            if not await self.store.commit(change) and len(seen) > 1:
                for one in seen:  # one of them was removed or written meanwhile: the others on their own
                    await self.record_seen([one])
        except errors.Unavailable as exc:
            log.warning("last seen not recorded", clusters=len(change.put), reason=str(exc))
