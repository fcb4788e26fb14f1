"""How user identity's records sit in the Store: small JSON documents, updated by compare-and-swap.

Reads on the Dial path use the Store's mirror (``Store.get``). A write that depends on what a record
says now (redeeming a login code, using a refresh credential, rotating keys) goes through
:func:`update`: it reads, decides, and commits only if the record still has the revision it read,
so two replicas acting on one record at once cannot both succeed. After a lost race it reads the KV
itself, not the mirror, which may not have the winner's write yet.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from clusterconnect.errors import Unavailable
from clusterconnect.relay.storage.kv import Change, Versioned
from clusterconnect.relay.storage.store import Store

# Lost races in a row before a write gives up (each loss means another replica wrote that record).
ATTEMPTS = 5


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def decode(value: Versioned | bytes | None) -> dict[str, Any] | None:
    """The document, or None for an absent record or one that is not a JSON object (never an exception:
    the store is written by other replicas, perhaps of another version)."""
    if value is None:
        return None
    raw = value.value if isinstance(value, Versioned) else value
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    return document if isinstance(document, dict) else None


async def read_through(store: Store, key: str) -> Versioned | None:
    """The record as the KV has it now (a round trip to etcd; never on the Dial path)."""
    return await store.kv.get(key)


async def update(store: Store, key: str,
                 decide: Callable[[Versioned | None], Change | None]) -> tuple[bool, Versioned | None]:
    """Commit ``decide(current record)`` with the expectation that ``key`` still has the revision read;
    ``decide`` is asked again after a lost race. Returns whether it wrote (not when ``decide`` returns
    None: nothing to do) and the record as it is now (read from the KV after a lost race: this
    replica's mirror may not have the winner's write yet)."""
    # Absent from the mirror may mean "written at another replica a moment ago": ask the KV.
    current = store.get(key) or await read_through(store, key)
    for _ in range(ATTEMPTS):
        change = decide(current)
        if change is None:
            return False, current
        revision = current.revision if current is not None else 0
        if await store.commit(Change(expect={**change.expect, key: revision}, put=change.put,
                                     delete=change.delete, delete_prefixes=change.delete_prefixes)):
            return True, store.get(key)
        current = await read_through(store, key)
    raise Unavailable(f"{key} changed {ATTEMPTS} times while this relay tried to update it; try again")
