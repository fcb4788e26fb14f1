"""One store interface for everything the relay keeps, with two implementations: SQLite (the embedded
default, one replica, in --data-dir) and etcd (several replicas).

The interface is a small versioned key-value map — what etcd offers and SQLite can do in one table —
so each kind of record (clusters, users, grants, join tokens, keys) is written once on top of it
instead of once per backend. Keys are paths (``clusters/prod``); values are bytes (the records' own
JSON); every write gets a revision, which makes compare-and-swap possible on both.

Atomicity: :meth:`KV.commit` applies its conditions and writes all at once or not at all (an etcd
Txn; a SQLite transaction), which is what create-if-absent, "remove a cluster and its grants" and
key rotation need.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from clusterconnect.relay.storage.etcd.api import rpc_pb2
from clusterconnect.relay.storage.etcd.client import Etcd, delete_op, put_op
from clusterconnect.relay.storage.sqlite import open_db

# Rows of an earlier version's table, column name -> value (SqliteKV.legacy_rows).
Rows = list[dict[str, object]]


@dataclass(frozen=True)
class Versioned:
    value: bytes
    revision: int


@dataclass(frozen=True)
class Change:
    """Conditions and writes applied together by :meth:`KV.commit`.

    ``expect`` maps a key to the revision it must have now (0: it must not exist). A key is put or
    deleted, not both, in one change (etcd refuses overlapping writes in one Txn)."""

    expect: dict[str, int] = field(default_factory=dict)
    put: dict[str, bytes] = field(default_factory=dict)
    delete: Sequence[str] = ()
    delete_prefixes: Sequence[str] = ()


class KV(Protocol):
    async def get(self, key: str) -> Versioned | None: ...

    async def list(self, prefix: str) -> list[tuple[str, Versioned]]: ...

    async def put(self, key: str, value: bytes) -> int: ...

    async def commit(self, change: Change) -> int:
        """Apply ``change`` if every expectation holds and return the revision it was written at;
        0 (and nothing written) otherwise."""
        ...

    async def close(self) -> None: ...


async def create(kv: KV, key: str, value: bytes) -> bool:
    """Write ``key`` only if it does not exist (create-if-absent, e.g. keys made once for all replicas)."""
    return bool(await kv.commit(Change(expect={key: 0}, put={key: value})))


async def delete(kv: KV, key: str) -> bool:
    """Delete ``key``; False if it was not there."""
    current = await kv.get(key)
    return current is not None and bool(await kv.commit(Change(expect={key: current.revision}, delete=[key])))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS kv_revision (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL
);
INSERT OR IGNORE INTO kv_revision (id, revision) VALUES (1, 0);
"""


class SqliteKV:
    """The embedded store: one table in the relay's SQLite file. One process writes it (one replica),
    so calls run inline: each is a local transaction of well under a millisecond."""

    def __init__(self, path: Path) -> None:
        self._db = open_db(path, _SCHEMA)

    async def close(self) -> None:
        self._db.close()

    async def get(self, key: str) -> Versioned | None:
        row = self._db.execute("SELECT value, revision FROM kv WHERE key = ?", (key,)).fetchone()
        return Versioned(bytes(row[0]), int(row[1])) if row else None

    async def list(self, prefix: str) -> list[tuple[str, Versioned]]:
        rows = self._db.execute(
            "SELECT key, value, revision FROM kv WHERE key >= ? AND key < ? ORDER BY key",
            (prefix, _upper_bound(prefix)),
        ).fetchall()
        return [(str(k), Versioned(bytes(v), int(r))) for k, v, r in rows]

    async def put(self, key: str, value: bytes) -> int:
        with self._transaction() as revision:
            self._db.execute("INSERT INTO kv (key, value, revision) VALUES (?, ?, ?)"
                             " ON CONFLICT (key) DO UPDATE SET value = excluded.value, revision = excluded.revision",
                             (key, value, revision))
        return revision

    async def commit(self, change: Change) -> int:
        with self._transaction() as revision:
            for key, expected in change.expect.items():
                row = self._db.execute("SELECT revision FROM kv WHERE key = ?", (key,)).fetchone()
                if (int(row[0]) if row else 0) != expected:
                    raise _Unmet
            for key in change.delete:
                self._db.execute("DELETE FROM kv WHERE key = ?", (key,))
            for prefix in change.delete_prefixes:
                self._db.execute("DELETE FROM kv WHERE key >= ? AND key < ?",
                                 (prefix, _upper_bound(prefix)))
            for key, value in change.put.items():
                self._db.execute("INSERT INTO kv (key, value, revision) VALUES (?, ?, ?) ON CONFLICT (key)"
                                 " DO UPDATE SET value = excluded.value, revision = excluded.revision",
                                 (key, value, revision))
            return revision
        return 0  # reached only when _transaction swallowed _Unmet

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    @property
    def db(self) -> sqlite3.Connection:
        """The SQLite connection, for a record store's one-time step on its earlier table (clusters.py)."""
        return self._db

    def legacy_rows(self, table: str) -> Rows | None:
        """The rows of ``table`` as an earlier version wrote it in this file (None if there is no such
        table): what a record store imports once into the KV (``Store.import_once``)."""
        if not self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone():
            return None
        cursor = self._db.execute(f'SELECT * FROM "{table}"')
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _upper_bound(prefix: str) -> str:
    """Every key that starts with ``prefix`` sorts below this (SQLite compares TEXT as UTF-8 bytes)."""
    return prefix + "\U0010ffff"


class _Unmet(Exception):
    """An expectation of a commit did not hold: roll back, report False."""


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, yielding the revision this transaction's writes get."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> int:
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("UPDATE kv_revision SET revision = revision + 1 WHERE id = 1")
        return int(self._db.execute("SELECT revision FROM kv_revision WHERE id = 1").fetchone()[0])

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if kind is None:
            self._db.execute("COMMIT")
            return False
        self._db.execute("ROLLBACK")
        return kind is _Unmet


class EtcdKV:
    """The replicated store: the same keys under ``/clusterconnect/store/`` in etcd."""

    ROOT = "/clusterconnect/store/"

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd

    def _key(self, key: str) -> bytes:
        return (self.ROOT + key).encode()

    async def close(self) -> None:
        await self.etcd.close()

    async def get(self, key: str) -> Versioned | None:
        record = await self.etcd.get(self._key(key))
        return Versioned(record.value, record.mod_revision) if record else None

    async def list(self, prefix: str) -> list[tuple[str, Versioned]]:
        values, _ = await self.etcd.get_prefix(self._key(prefix))
        cut = len(self.ROOT)
        return [(kv.key.decode()[cut:], Versioned(kv.value, kv.mod_revision)) for kv in values]

    async def put(self, key: str, value: bytes) -> int:
        return await self.etcd.put(self._key(key), value)

    async def commit(self, change: Change) -> int:
        compare = [
            rpc_pb2.Compare(key=self._key(key), target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL,
                            mod_revision=revision)
            for key, revision in change.expect.items()
        ]
        ops = [delete_op(self._key(key)) for key in change.delete]
        ops += [delete_op(self._key(prefix), prefix=True) for prefix in change.delete_prefixes]
        ops += [put_op(self._key(key), value) for key, value in change.put.items()]
        response = await self.etcd.txn(compare, ops)
        return int(response.header.revision) if response.succeeded else 0
