"""Relay replicas on the test etcd (conftest's ``etcd_cluster``): the flags every replica of one store
is started with, and an empty store to start from (the etcd is shared by the whole session)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from clusterconnect.relay.storage.kv import Change, EtcdKV


def etcd_flags(etcd_cluster, sealing_key: Path) -> list[str]:
    return ["--store", "etcd", "--etcd-endpoints", etcd_cluster.endpoints, "--etcd-ca", str(etcd_cluster.ca_file),
            "--etcd-cert", str(etcd_cluster.client_cert), "--etcd-key", str(etcd_cluster.client_key),
            "--sealing-key-file", str(sealing_key)]


def empty_store(etcd_cluster) -> None:
    async def clear() -> None:
        kv = EtcdKV(etcd_cluster.client())
        try:
            await kv.commit(Change(delete_prefixes=[""]))
        finally:
            await kv.close()

    asyncio.run(clear())
