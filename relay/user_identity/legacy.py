"""Data directories of earlier versions: their SQLite tables (users, grants, issuer keys) imported once.

Earlier relays kept user identity in tables of ``DATA_DIR/relay.db``. At start each store copies the
rows of its tables into the Store in one commit that also creates a marker ``meta/imported/<table>``
(expected absent), so the import happens once, even with two replicas starting together. The old
tables are left as they were (a downgrade still finds them), except ``issuer_keys``, whose rows the
keys store wipes once they are in the Store (issuer.py: no private key, even sealed, lingers twice).
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

from clusterconnect.relay.storage.kv import Change
from clusterconnect.relay.storage.store import Store

MARKER = "meta/imported/"


def pending(store: Store, db: Path | None, *tables: str) -> dict[str, list[dict[str, Any]]]:
    """The rows (column -> value) of each of ``tables`` that exists in ``db`` and was not imported yet."""
    if db is None or not db.exists() or all(store.get(MARKER + t) is not None for t in tables):
        return {}
    found: dict[str, list[dict[str, Any]]] = {}
    with closing(sqlite3.connect(db)) as conn:
        for table in tables:
            exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                  (table,)).fetchone()
            if exists and store.get(MARKER + table) is None:
                cursor = conn.execute(f"SELECT * FROM {table}")  # our own table names, not input
                columns = [d[0] for d in cursor.description]
                found[table] = [dict(zip(columns, row, strict=True)) for row in cursor]
    return found


async def import_once(store: Store, tables: list[str], put: dict[str, bytes]) -> bool:
    """Write ``put`` with a marker per table, unless a marker exists already (imported by another
    replica, or a start before this one): then nothing is written and False returned."""
    markers = {MARKER + t: b"1" for t in tables}
    return await store.commit(Change(expect={m: 0 for m in markers}, put={**put, **markers}))
