"""The relay's cluster registry, in SQLite in the data directory (the embedded default).

Agents authenticate with client certificates; join tokens and certificate serials live in
relay/agent_identity/enrollment.py's tables of the same database. The ``credential_sha256`` column is a leftover
of bearer agent credentials and stays empty.
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from clusterconnect import errors
from clusterconnect.relay.storage.sqlite import open_db

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


def validate_name(name: str) -> None:
    if not CLUSTER_NAME.match(name):
        raise InvalidName(
            f"invalid cluster name {name!r}: use lower-case letters, digits and '-', at most 63 characters"
        )


class ClusterStore:
    def __init__(self, path: Path) -> None:
        self._db = open_db(path, _SCHEMA)

    def close(self) -> None:
        self._db.close()

    def add(self, name: str) -> ClusterRecord:
        """Register a cluster (its agent joins with a token from relay/agent_identity/enrollment.py)."""
        validate_name(name)
        now = int(time.time())
        try:
            self._db.execute(
                "INSERT INTO clusters (name, credential_sha256, created_unix) VALUES (?, '', ?)",
                (name, now),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"cluster {name} already exists") from None
        return ClusterRecord(name, now, 0, "", "")

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

    def record_seen(self, name: str, seen_unix: int, agent_version: str, kubernetes_version: str) -> None:
        self._db.execute(
            "UPDATE clusters SET last_seen_unix = ?, agent_version = ?, kubernetes_version = ?"
            " WHERE name = ?",
            (seen_unix, agent_version, kubernetes_version, name),
        )
