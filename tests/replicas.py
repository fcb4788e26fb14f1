"""Relay replicas on the test etcd (conftest's ``etcd_cluster``): the flags every replica of one store
is started with, two such replicas, and an empty store to start from (the etcd is shared by the whole
session)."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from chain import Chain, free_port

from clusterconnect.pki import KeyPair, create_ca, issue_server_cert, write_private
from clusterconnect.relay.storage.kv import Change, EtcdKV
from clusterconnect.relay.storage.sealing import SealingKey


def etcd_flags(etcd_cluster, sealing_key: Path) -> list[str]:
    """A replica's flags: the store, a peer port and certificate of its own (relay-peer CA beside the
    sealing key), and the sealing key last."""
    return ["--store", "etcd", "--etcd-endpoints", etcd_cluster.endpoints, "--etcd-ca", str(etcd_cluster.ca_file),
            "--etcd-cert", str(etcd_cluster.client_cert), "--etcd-key", str(etcd_cluster.client_key),
            *peer_flags(sealing_key.parent / "peer-pki"), "--sealing-key-file", str(sealing_key)]


def two_replicas(etcd_cluster, state: Path) -> tuple[Chain, Chain]:
    """Two relay chains (not started) on one empty store with one sealing key, in ``state``/one and
    ``state``/two; no cluster behind them."""
    empty_store(etcd_cluster)
    sealing = state / "sealing.key"
    SealingKey.load_or_create(sealing)
    # Each replica its own peer port and certificate (etcd_flags makes new ones per call).
    one = Chain(state / "one", Path("/nonexistent"), relay_args=etcd_flags(etcd_cluster, sealing))
    two = Chain(state / "two", Path("/nonexistent"), relay_args=etcd_flags(etcd_cluster, sealing))
    return one, two


def peer_flags(pki: Path) -> list[str]:
    """--peer-listen on a free port and a new certificate of the relay-peer CA in ``pki`` (made once)."""
    pki.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = pki / "ca.crt", pki / "ca.key"
    if not ca_cert.exists():
        ca = create_ca("clusterconnect relay-peer CA (test)")
        write_private(ca_key, ca.key_pem)
        ca_cert.write_bytes(ca.cert_pem)
    pair = issue_server_cert(KeyPair(ca_cert.read_bytes(), ca_key.read_bytes()), ["localhost", "127.0.0.1"],
                             client_auth=True)
    name = secrets.token_hex(4)
    write_private(pki / f"{name}.key", pair.key_pem)
    (pki / f"{name}.crt").write_bytes(pair.cert_pem)
    return ["--peer-listen", f"127.0.0.1:{free_port()}", "--peer-ca", str(ca_cert),
            "--peer-cert", str(pki / f"{name}.crt"), "--peer-key", str(pki / f"{name}.key")]


def empty_store(etcd_cluster) -> None:
    async def clear() -> None:
        kv = EtcdKV(etcd_cluster.client())
        try:
            await kv.commit(Change(delete_prefixes=[""]))
        finally:
            await kv.close()

    asyncio.run(clear())
