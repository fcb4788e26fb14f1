"""The relay's cluster registry, in SQLite in the data directory (the embedded default).

Agents authenticate with client certificates; join tokens and certificate serials live in
relay/agent_identity/enrollment.py's tables of the same database. The ``credential_sha256`` column is a leftover
of bearer agent credentials and stays empty.

Each registration gets a random ``uid``, never reused: what belongs to one registration (its access
list, relay/user_identity/access.py) is keyed by it and deleted with it, so a cluster registered
again under the same name, even within the same second, starts with nothing of the old one.
"""

from __future__ import annotations

import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from clusterconnect import errors
from clusterconnect.relay.storage.sqlite import add_column, open_db

CLUSTER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clusters (
    name TEXT PRIMARY KEY,
    credential_sha256 TEXT NOT NULL,
    created_unix INTEGER NOT NULL,
    last_seen_unix INTEGER NOT NULL DEFAULT 0,
    agent_version TEXT NOT NULL DEFAULT '',
    kubernetes_version TEXT NOT NULL DEFAULT '',
    uid TEXT NOT NULL DEFAULT ''
);
"""
# After the migration in ClusterStore.__init__ (an index on a column that may have just been added).
_UID_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS clusters_uid ON clusters (uid)"
_COLUMNS = "name, created_unix, last_seen_unix, agent_version, kubernetes_version, uid"


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
    uid: str = ""  # unique per registration


def _new_uid() -> str:
    return secrets.token_hex(16)


def validate_name(name: str) -> None:
    if not CLUSTER_NAME.match(name):
        raise InvalidName(
            f"invalid cluster name {name!r}: use lower-case letters, digits and '-', at most 63 characters"
        )


class ClusterStore:
    def __init__(self, path: Path) -> None:
        self._db = open_db(path, _SCHEMA)
        add_column(self._db, "clusters", "uid", "TEXT NOT NULL DEFAULT ''")
        # Rows of an earlier version get their uid here, once.
        for (name,) in self._db.execute("SELECT name FROM clusters WHERE uid = ''").fetchall():
            self._db.execute("UPDATE clusters SET uid = ? WHERE name = ?", (_new_uid(), name))
        self._db.execute(_UID_INDEX)

    def close(self) -> None:
        self._db.close()

    def add(self, name: str) -> ClusterRecord:
        """Register a cluster (its agent joins with a token from relay/agent_identity/enrollment.py)."""
        validate_name(name)
        now = int(time.time())
        uid = _new_uid()
        try:
            self._db.execute(
                "INSERT INTO clusters (name, credential_sha256, created_unix, uid) VALUES (?, '', ?, ?)",
                (name, now, uid),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"cluster {name} already exists") from None
        return ClusterRecord(name, now, 0, "", "", uid)

    def remove(self, name: str) -> bool:
        """Unregister; what is keyed by its uid (the access list) goes with it (ON DELETE CASCADE)."""
        return self._db.execute("DELETE FROM clusters WHERE name = ?", (name,)).rowcount > 0

    def get(self, name: str) -> ClusterRecord | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM clusters WHERE name = ?",
            (name,),
        ).fetchone()
        return ClusterRecord(*row) if row else None

    def list(self) -> list[ClusterRecord]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM clusters ORDER BY name"
        ).fetchall()
        return [ClusterRecord(*row) for row in rows]

    def record_seen(self, name: str, seen_unix: int, agent_version: str, kubernetes_version: str) -> None:
        self._db.execute(
            "UPDATE clusters SET last_seen_unix = ?, agent_version = ?, kubernetes_version = ?"
            " WHERE name = ?",
            (seen_unix, agent_version, kubernetes_version, name),
        )
