"""Where the relay keeps its state: ``--store sqlite`` (the embedded default, one replica, in --data-dir)
or ``--store etcd`` (several replicas) with the etcd flags. One definition of the flags, used by
``serve`` and ``migrate``."""

from __future__ import annotations

import argparse
from pathlib import Path

from clusterconnect import cliargs
from clusterconnect.errors import InvalidInput, StartupError
from clusterconnect.relay.storage.etcd.client import Etcd, EtcdTLS, parse_endpoints
from clusterconnect.relay.storage.kv import EtcdKV, SqliteKV

SQLITE = "sqlite"
ETCD = "etcd"


def add_flags(parser: argparse.ArgumentParser) -> None:
    cliargs.add_flag(parser, "--store", choices=(SQLITE, ETCD), default=SQLITE,
                     help="sqlite: the embedded store in DATA_DIR (one replica); etcd: shared by every replica")
    cliargs.add_flag(parser, "--etcd-endpoints", default="",
                     help="with --store etcd: https://HOST:PORT of each etcd member, comma-separated")
    add_tls_flags(parser)


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    """The etcd client's TLS files (migrate has them without --store: its target names the endpoints)."""
    cliargs.add_flag(parser, "--etcd-ca", type=Path, help="CA file that signed the etcd members' certificates")
    cliargs.add_flag(parser, "--etcd-cert", type=Path, help="client certificate the relay presents to etcd")
    cliargs.add_flag(parser, "--etcd-key", type=Path, help="key of --etcd-cert")


def open_kv(args: argparse.Namespace, data_dir: Path) -> SqliteKV | EtcdKV:
    """The KV that ``--store`` names: DATA_DIR/relay.db, or the etcd cluster of the etcd flags."""
    if args.store == ETCD:
        return EtcdKV(etcd_client(args))
    return SqliteKV(data_dir / "relay.db")


def etcd_client(args: argparse.Namespace) -> Etcd:
    """The etcd client the flags describe (TLS unless every endpoint is http://, which only tests use)."""
    if not args.etcd_endpoints:
        raise StartupError("--store etcd needs --etcd-endpoints")
    try:
        endpoints = parse_endpoints(args.etcd_endpoints)
    except InvalidInput as exc:
        raise StartupError(str(exc)) from None
    plain = all(item.strip().startswith("http://") for item in args.etcd_endpoints.split(",") if item.strip())
    if plain:
        return Etcd(endpoints, None)
    if args.etcd_ca is None:
        raise StartupError("--store etcd needs --etcd-ca (the CA of the etcd members' certificates)")
    if bool(args.etcd_cert) != bool(args.etcd_key):
        raise StartupError("--etcd-cert and --etcd-key go together")
    try:
        tls = EtcdTLS(
            ca=args.etcd_ca.read_bytes(),
            cert=args.etcd_cert.read_bytes() if args.etcd_cert else None,
            key=args.etcd_key.read_bytes() if args.etcd_key else None,
        )
    except OSError as exc:
        raise StartupError(f"cannot read an etcd TLS file: {exc}") from None
    return Etcd(endpoints, tls)
