"""The relay's cluster registry, in SQLite in the data directory (the embedded default).

Agent credentials are stored as SHA-256 hashes: they are random 256-bit secrets, so a plain hash
is enough, and a stolen database does not let anyone pose as an agent.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

CLUSTER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clusters (
    name TEXT PRIMARY KEY,
    credential_sha256 TEXT NOT NULL,
    created_unix INTEGER NOT NULL,
    last_seen_unix INTEGER NOT NULL DEFAULT 0,
    agent_version TEXT NOT NULL DEFAULT '',
    kubernetes_version TEXT NOT NULL DEFAULT ''
);
"""


class InvalidName(ValueError):
    pass


class AlreadyExists(ValueError):
    pass


@dataclass(frozen=True)
class ClusterRecord:
    name: str
    created_unix: int
    last_seen_unix: int
    agent_version: str
    kubernetes_version: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def validate_name(name: str) -> None:
    if not CLUSTER_NAME.match(name):
        raise InvalidName(
            f"invalid cluster name {name!r}: use lower-case letters, digits and '-', at most 63 characters"
        )


class ClusterStore:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def add(self, name: str) -> tuple[ClusterRecord, str]:
        """Register a cluster; returns it and the agent credential (shown once)."""
        validate_name(name)
        credential = secrets.token_urlsafe(32)
        now = int(time.time())
        try:
            self._db.execute(
                "INSERT INTO clusters (name, credential_sha256, created_unix) VALUES (?, ?, ?)",
                (name, _digest(credential), now),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"cluster {name} already exists") from None
        return ClusterRecord(name, now, 0, "", ""), credential

    def remove(self, name: str) -> bool:
        return self._db.execute("DELETE FROM clusters WHERE name = ?", (name,)).rowcount > 0

    def get(self, name: str) -> ClusterRecord | None:
        row = self._db.execute(
            "SELECT name, created_unix, last_seen_unix, agent_version, kubernetes_version"
            " FROM clusters WHERE name = ?",
            (name,),
        ).fetchone()
        return ClusterRecord(*row) if row else None

    def list(self) -> list[ClusterRecord]:
        rows = self._db.execute(
            "SELECT name, created_unix, last_seen_unix, agent_version, kubernetes_version"
            " FROM clusters ORDER BY name"
        ).fetchall()
        return [ClusterRecord(*row) for row in rows]

    def verify_agent(self, name: str, credential: str) -> bool:
        row = self._db.execute(
            "SELECT credential_sha256 FROM clusters WHERE name = ?", (name,)
        ).fetchone()
        # Compare against a dummy digest for unknown names so timing does not reveal them.
        expected = row[0] if row else _digest(secrets.token_hex(16))
        return hmac.compare_digest(expected, _digest(credential)) and row is not None

    def record_seen(self, name: str, seen_unix: int, agent_version: str, kubernetes_version: str) -> None:
        self._db.execute(
            "UPDATE clusters SET last_seen_unix = ?, agent_version = ?, kubernetes_version = ?"
            " WHERE name = ?",
            (seen_unix, agent_version, kubernetes_version, name),
        )
