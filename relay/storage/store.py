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
from collections.abc import Callable

from clusterconnect.errors import Unavailable
from clusterconnect.relay.storage.etcd.cache import PrefixCache
from clusterconnect.relay.storage.etcd.client import EtcdUnavailable
from clusterconnect.relay.storage.kv import Change, EtcdKV, SqliteKV, Versioned

# (key, value or None when deleted): told of every change, whichever replica made it.
Listener = Callable[[str, bytes | None], None]

# A write returns once the watch has brought it back; etcd delivers it in milliseconds. Longer than
# this means this replica's watch is broken: the write happened, but the caller hears so.
MIRROR_CATCH_UP_SECONDS = 10.0


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

    # -- feeding the mirror ------------------------------------------------------------------------------

    def _apply_locally(self, change: Change, revision: int) -> None:
        gone = set(change.delete)
        for prefix in change.delete_prefixes:
            gone.update(k for k in self._values if k.startswith(prefix))
        for key in gone:
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
