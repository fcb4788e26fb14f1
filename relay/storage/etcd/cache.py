"""A watch-fed cache of every key under a prefix: reads on the Dial path never wait on etcd.

``run()`` lists the prefix, then watches it from the next revision; each change updates the map
and wakes whoever waits for one (:meth:`wait_for`). When the watch breaks it is opened again from
the last revision seen, on the next member; when etcd has compacted that revision away the prefix
is listed afresh and the difference is applied as changes, so no waiter misses a delete.

The cache is only as fresh as its watch: ``synced`` is set while a watch is open and has caught
up, cleared while it is being re-opened (callers that must not act on stale routes check it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from clusterconnect.logs import get_logger
from clusterconnect.relay.storage.etcd.client import Compacted, Etcd, EtcdUnavailable

log = get_logger(__name__)

# (key, value or None for a delete, revision of the change)
ChangeListener = Callable[[bytes, bytes | None, int], None]

# After a broken watch, wait this long before the next try (doubling, capped): a member restart
# takes about a second; a partitioned replica should not spin.
RETRY_FIRST = 0.1
RETRY_MAX = 2.0


class PrefixCache:
    def __init__(self, etcd: Etcd, prefix: bytes, on_change: ChangeListener | None = None) -> None:
        self._etcd = etcd
        self.prefix = prefix
        # Told of every change as it is applied (and of each key again after a re-list), so an owner
        # can keep an index of its own (the route table indexes routes by cluster).
        self._on_change = on_change
        # key -> (value, mod_revision): the revision orders writes of different keys (newest route wins)
        self._values: dict[bytes, tuple[bytes, int]] = {}
        self.revision = 0
        self.synced = asyncio.Event()
        self._changed = asyncio.Condition()
        # Counters for the tests and stats: how often the prefix was listed, and watches re-opened.
        self.lists = 0
        self.rewatches = 0

    # -- reads (no await: straight from memory) -------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        entry = self._values.get(key)
        return entry[0] if entry is not None else None

    def revision_of(self, key: bytes) -> int:
        """The revision ``key`` was last written at (0 if absent)."""
        entry = self._values.get(key)
        return entry[1] if entry is not None else 0

    def items(self, under: bytes = b"") -> list[tuple[bytes, bytes]]:
        start = self.prefix + under
        return [(k, v) for k, (v, _) in self._values.items() if k.startswith(start)]

    def __len__(self) -> int:
        return len(self._values)

    async def wait_for(self, predicate: Callable[[PrefixCache], bool], timeout: float) -> bool:
        """Wait until ``predicate(self)`` holds (checked now and after each change); False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    await self._changed.wait_for(lambda: predicate(self))
        except TimeoutError:
            return False
        return True

    # -- the watch loop (owned by the store's TaskGroup) -------------------------------------------------

    async def run(self) -> None:
        delay = RETRY_FIRST
        need_list = True
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                async for batch in self._etcd.watch_prefix(self.prefix, self.revision + 1):
                    delay = RETRY_FIRST
                    self.synced.set()
                    for event in batch.events:
                        if event.value is None:
                            self._values.pop(event.key, None)
                        else:
                            self._values[event.key] = (event.value, event.mod_revision)
                        if self._on_change is not None:
                            self._on_change(event.key, event.value, event.mod_revision)
                    self.revision = max(self.revision, batch.revision)
                    if batch.events:
                        await self._notify()
            except Compacted as exc:
                log.info("etcd watch behind compaction; listing again", prefix=self.prefix.decode(errors="replace"),
                         compact_revision=exc.compact_revision)
                need_list = True
            except EtcdUnavailable as exc:
                log.warning("etcd watch broke; watching again", prefix=self.prefix.decode(errors="replace"),
                            reason=str(exc), retry_in=delay)
            self.synced.clear()
            self.rewatches += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _list(self) -> None:
        values, revision = await self._etcd.get_prefix(self.prefix)
        fresh = {kv.key: (kv.value, kv.mod_revision) for kv in values}
        if self._on_change is not None:  # the difference, as changes: deletes missed while not watching too
            for key in self._values.keys() - fresh.keys():
                self._on_change(key, None, revision)
            for key, (value, mod_revision) in fresh.items():
                if self._values.get(key) != (value, mod_revision):
                    self._on_change(key, value, mod_revision)
        self._values = fresh
        self.revision = revision
        self.lists += 1
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
