"""The relay's state as the record stores see it: a :class:`~clusterconnect.relay.storage.kv.KV` with every
key mirrored in memory.

Reads (``get``, ``list``) are from the mirror and never wait: the Dial path (cluster, access list,
agent certificate serial, token keys) must not make a round trip to etcd. Writes go to the KV
and return once the mirror holds them, so a write is visible to the next read of this process.

Where the mirror is fed from:
- SQLite (one replica): loaded once at start; afterwards only this process writes, so each commit
  is applied to the mirror as it succeeds.
- etcd (several replicas): a watch of the store's prefix (PrefixCache), so a write made by another
  replica reaches this one too, and ``subscribe`` listeners hear of it (a user removed at replica 1
  ends that user's connections at replica 3).

A replica cut off from etcd keeps reading its mirror (connections keep being served); its writes
fail with :class:`~clusterconnect.errors.Unavailable`, which the admin API reports as one line.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from clusterconnect.errors import Unavailable
from clusterconnect.relay.storage.etcd.cache import PrefixCache
from clusterconnect.relay.storage.etcd.client import EtcdUnavailable
from clusterconnect.relay.storage.kv import Change, EtcdKV, Rows, SqliteKV, Versioned

# (key, value or None when deleted): told of every change, whichever replica made it.
Listener = Callable[[str, bytes | None], None]

# A write returns once the watch has brought it back; etcd delivers it in milliseconds. Longer than
# this means this replica's watch is broken: the write happened, but the caller hears so.
MIRROR_CATCH_UP_SECONDS = 10.0


def encode(document: dict[str, Any]) -> bytes:
    """A record's value: compact JSON with sorted keys (the same record is the same bytes)."""
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def decode(value: bytes) -> dict[str, Any] | None:
    """A record's JSON object (None if the bytes are not one: never trust what another writer left)."""
    try:
        document = json.loads(value)
    except (UnicodeDecodeError, ValueError):
        return None
    return document if isinstance(document, dict) else None


class Store:
    def __init__(self, kv: SqliteKV | EtcdKV) -> None:
        self.kv = kv
        self._values: dict[str, Versioned] = {}
        self._listeners: list[tuple[str, Listener]] = []
        self._cache: PrefixCache | None = None
        if isinstance(kv, EtcdKV):
            self._cache = PrefixCache(kv.etcd, kv.ROOT.encode(), on_change=self._changed)

    @classmethod
    async def open(cls, kv: SqliteKV | EtcdKV) -> Store:
        """For SQLite, ready at once. For etcd, call :meth:`run` in the owner's TaskGroup, then :meth:`ready`."""
        store = cls(kv)
        if store._cache is None:
            for key, value in await kv.list(""):
                store._values[key] = value
        return store

    async def run(self) -> None:
        """Keep the mirror fed (etcd); returns at once for SQLite."""
        if self._cache is not None:
            await self._cache.run()

    async def ready(self, timeout: float) -> None:
        """Wait for the first full listing of the store (etcd)."""
        if self._cache is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await self._cache.synced.wait()
        except TimeoutError:
            raise Unavailable(f"the store (etcd) did not answer within {timeout:g} s") from None

    @property
    def synced(self) -> bool:
        """False while the etcd watch is being re-opened (the mirror may be stale)."""
        return self._cache is None or self._cache.synced.is_set()

    async def close(self) -> None:
        await self.kv.close()

    # -- reads: from memory ---------------------------------------------------------------------------

    def get(self, key: str) -> Versioned | None:
        return self._values.get(key)

    def list(self, prefix: str) -> list[tuple[str, Versioned]]:
        return sorted((k, v) for k, v in self._values.items() if k.startswith(prefix))

    def get_json(self, key: str) -> dict[str, Any] | None:
        """The JSON document at ``key`` (None if absent or not a JSON object: never trust a peer's bytes)."""
        current = self._values.get(key)
        return None if current is None else decode(current.value)

    async def read(self, key: str) -> Versioned | None:
        """``key`` as the KV has it now (etcd: a linearizable read). For a write that must see another
        replica's last write (consuming a join token made there a moment ago), never for the Dial path."""
        try:
            return await self.kv.get(key)
        except EtcdUnavailable as exc:
            raise Unavailable(f"the store (etcd) is unreachable: {exc}") from None

    def subscribe(self, prefix: str, listener: Listener) -> None:
        """Call ``listener`` for each change of a key under ``prefix``, made here or at another replica."""
        self._listeners.append((prefix, listener))

    # -- writes --------------------------------------------------------------------------------------

    async def commit(self, change: Change) -> bool:
        """Apply ``change`` if its expectations hold (False, nothing written, otherwise); visible on return."""
        try:
            revision = await self.kv.commit(change)
        except EtcdUnavailable as exc:
            raise Unavailable(f"the store (etcd) is unreachable: {exc}") from None
        if not revision:
            return False
        if self._cache is None:
            self._apply_locally(change, revision)
        elif not await self._cache.wait_for(lambda cache: cache.revision >= revision, MIRROR_CATCH_UP_SECONDS):
            raise Unavailable("written, but this relay's view of the store (etcd watch) is behind")
        return True

    async def put(self, key: str, value: bytes) -> None:
        await self.commit(Change(put={key: value}))

    async def create(self, key: str, value: bytes) -> bool:
        """Write ``key`` only if absent (create-if-absent: keys made once for all replicas)."""
        return await self.commit(Change(expect={key: 0}, put={key: value}))

    async def delete(self, *keys: str) -> bool:
        """Delete ``keys`` that exist; False if none did."""
        present = [key for key in keys if key in self._values]
        return bool(present) and await self.commit(Change(delete=present))

    async def import_once(self, table: str, records: Callable[[Rows], dict[str, bytes]]) -> int:
        """Copy an earlier version's SQLite ``table`` into the KV, once: ``records`` turns its rows into
        keys and values, written in one commit with the marker ``meta/imported/<table>`` (expected absent),
        so a second start (or a second replica) imports nothing. The old table is left as it was.
        Returns how many records were written (0: nothing to import, or imported before)."""
        marker = f"meta/imported/{table}"
        if not isinstance(self.kv, SqliteKV) or self.get(marker) is not None:
            return 0
        rows = self.kv.legacy_rows(table)
        if rows is None:
            return 0
        written = records(rows)
        imported = await self.commit(Change(expect={marker: 0}, put={marker: b"{}", **written}))
        return len(written) if imported else 0

    # -- feeding the mirror ------------------------------------------------------------------------------

    def _apply_locally(self, change: Change, revision: int) -> None:
        gone = set(change.delete)
        for prefix in change.delete_prefixes:
            gone.update(k for k in self._values if k.startswith(prefix))
        for key in sorted(gone):
            if self._values.pop(key, None) is not None:
                self._tell(key, None)
        for key, value in change.put.items():
            self._values[key] = Versioned(value, revision)
            self._tell(key, value)

    def _changed(self, raw_key: bytes, value: bytes | None, revision: int) -> None:
        key = raw_key.decode()[len(EtcdKV.ROOT):]
        if value is None:
            if self._values.pop(key, None) is None:
                return
        else:
            self._values[key] = Versioned(value, revision)
        self._tell(key, value)

    def _tell(self, key: str, value: bytes | None) -> None:
        for prefix, listener in self._listeners:
            if key.startswith(prefix):
                listener(key, value)
