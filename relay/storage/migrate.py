"""``clusterconnect-relay migrate --from sqlite:DIR --to etcd:ENDPOINTS``: copy a single relay's store
to etcd, for replicas to share.

Every record is copied as it is (sealed values stay sealed: the replicas need DIR's sealing key,
DIR/sealing.key, as their --sealing-key-file). Records an earlier version kept in its own SQLite
tables are imported into DIR's store first, as a start of this version would. A target that holds
records already is refused unless ``--force`` (which clears it first): two registries never mix.

etcd takes at most 128 operations in one transaction (``--max-txn-ops``), so the copy is written in
batches; a copy that fails half-way is finished by running it again with ``--force``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clusterconnect import cliargs
from clusterconnect.errors import InvalidInput, StartupError
from clusterconnect.relay.agent_identity.enrollment import EnrollmentStore
from clusterconnect.relay.storage import backend
from clusterconnect.relay.storage.clusters import ClusterStore
from clusterconnect.relay.storage.kv import Change, EtcdKV, SqliteKV
from clusterconnect.relay.storage.store import Store

BATCH = 100  # puts per etcd transaction: below etcd's default --max-txn-ops (128)


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = commands.add_parser("migrate", help="copy a relay's store from SQLite to etcd")
    cliargs.add_flag(migrate, "--from", dest="source", required=True, help="sqlite:DIR, the --data-dir of a relay")
    cliargs.add_flag(migrate, "--to", dest="target", required=True,
                     help="etcd:https://HOST:PORT,... (the members, as --etcd-endpoints)")
    cliargs.add_flag(migrate, "--force", action="store_true", default=False,
                     help="clear a target that holds records already, then copy")
    backend.add_tls_flags(migrate)


def _parse(value: str, scheme: str, flag: str) -> str:
    kind, _, rest = value.partition(":")
    if kind != scheme or not rest:
        what = "DIR" if scheme == backend.SQLITE else "ENDPOINTS"
        raise InvalidInput(f"{flag} must be {scheme}:{what}, got {value!r}")
    return rest


async def migrate(args: argparse.Namespace) -> int:
    """Copy every record; returns how many (printed by the caller)."""
    data_dir = Path(_parse(args.source, backend.SQLITE, "--from"))
    endpoints = _parse(args.target, backend.ETCD, "--to")
    if not (data_dir / "relay.db").exists():
        raise StartupError(f"{data_dir} holds no relay.db: --from names a relay's --data-dir")
    source = await Store.open(SqliteKV(data_dir / "relay.db"))
    try:
        # What an earlier version kept in its own tables, into the KV first (as `serve` does at start).
        await ClusterStore.open(source)
        await EnrollmentStore.open(source)
        records = [(key, value.value) for key, value in source.list("")]
    finally:
        await source.close()
    target = EtcdKV(backend.etcd_client(argparse.Namespace(**{**vars(args), "etcd_endpoints": endpoints})))
    try:
        present = await target.list("")
        if present and not args.force:
            raise StartupError(f"the target store holds {len(present)} records already: --force to replace them")
        if present:
            await target.commit(Change(delete_prefixes=[""]))
        for start in range(0, len(records), BATCH):
            await target.commit(Change(put=dict(records[start:start + BATCH])))
    finally:
        await target.close()
    return len(records)
