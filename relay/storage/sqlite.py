"""The relay's SQLite file (the embedded default): every store opens it the same way."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# SQLite gives its -wal and -shm files the mode of the database file, so making that one 600 covers all three.
_COMPANIONS = ("", "-wal", "-shm")


def _owner_only(path: Path) -> None:
    """Create ``path`` with mode 600 if absent (whatever the umask), and make it and its companions 600."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for suffix in _COMPANIONS:
        try:
            os.chmod(f"{path}{suffix}", 0o600)
        except FileNotFoundError:
            pass


def open_db(path: Path, schema: str) -> sqlite3.Connection:
    """Autocommit connection in WAL mode (readers never block the writer), with ``schema`` applied."""
    _owner_only(path)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA foreign_keys=ON")
    db.executescript(schema)
    return db


def add_column(db: sqlite3.Connection, table: str, column: str, declaration: str) -> bool:
    """Add ``column`` to a ``table`` made by an earlier version (a migration); False if it is there already."""
    present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    if column in present:
        return False
    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
    return True


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction on an autocommit connection: all of the block or nothing."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
