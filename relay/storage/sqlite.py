"""The relay's SQLite file (the embedded default): every store opens it the same way."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_db(path: Path, schema: str) -> sqlite3.Connection:
    """Autocommit connection in WAL mode (readers never block the writer), with ``schema`` applied."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA foreign_keys=ON")
    db.executescript(schema)
    return db
