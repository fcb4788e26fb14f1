"""Secrets at rest (#11 point 5): the issuer's signing keys are sealed with a key that is not in the
database, and every key and database file the relay writes is 600 whatever the umask.

A real `clusterconnect-relay serve` started under umask 000, a user logged in with the real CLI; then
relay.db is copied as a thief would, and the copy must not let anyone sign a token the relay accepts.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import subprocess
import time
from contextlib import closing

import grpc
import jwt
import pytest
from chain import Chain, free_port, script
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from identities import login_with_code
from relay_dial import dial_status

from clusterconnect import credentials
from clusterconnect.relay.storage.kv import SqliteKV
from clusterconnect.relay.storage.sealing import SealBroken, SealingKey
from clusterconnect.relay.storage.store import Store
from clusterconnect.relay.user_identity.issuer import KEYRING, SigningKeys, public_jwk

# The CA keys are in the store, sealed (relay/storage/shared.py): no file holds them.
PRIVATE_KEY_FILES = ("relay.db", "relay.db-wal", "relay.db-shm", "sealing.key", "admin.credential", "pki/tls.key")
REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """A relay started under umask 000, cluster dev (no agent) listing alice, alice logged in."""
    state = tmp_path_factory.mktemp("secrets-at-rest")
    chain = Chain(state, state / "unused.kubeconfig")
    user_state = state / "alice"
    previous = os.umask(0)
    try:
        chain.start_relay()  # the relay inherits umask 000
    finally:
        os.umask(previous)
    try:
        chain.add_cluster()
        login_with_code(chain, "alice", ["dev"], user_state)
        chain.cli("clusters", "grant", chain.cluster, "--user", "alice")
        token, _ = credentials.get_token(user_state, credentials.list_logins(user_state)[0])
        yield type("Relay", (), {"chain": chain, "token": token})
    finally:
        chain.stop_all()


def _stolen_copy(relay, tmp_path) -> sqlite3.Connection:
    """relay.db as a thief copies it from the running relay (committed WAL content included)."""
    stolen = sqlite3.connect(tmp_path / "stolen.db")
    with closing(sqlite3.connect(relay.chain.relay_data / "relay.db")) as live:
        live.backup(stolen)
    return stolen


def _signing_keys(db: sqlite3.Connection) -> list[tuple[str, str]]:
    """(kid, stored private key) of the issuer's keyring in the store's table of a relay.db."""
    (value,) = db.execute("SELECT value FROM kv WHERE key = ?", (KEYRING,)).fetchone()
    return [(k["kid"], k["private"]) for k in json.loads(value)["keys"]]


def test_every_key_and_database_file_is_owner_only_whatever_the_umask(relay):
    data = relay.chain.relay_data
    for name in PRIVATE_KEY_FILES:
        assert (data / name).stat().st_mode & 0o777 == 0o600, f"{name}: {oct((data / name).stat().st_mode)}"
    for path in data.rglob("*"):
        if path.is_file() and path.suffix != ".crt":
            assert path.stat().st_mode & 0o077 == 0, f"{path.relative_to(data)} is open to others"


def test_a_stolen_database_holds_no_signing_key(relay, tmp_path):
    with closing(_stolen_copy(relay, tmp_path)) as stolen:
        rows = _signing_keys(stolen)
    assert len(rows) >= 2  # current and next
    data = relay.chain.relay_data
    for path in (tmp_path / "stolen.db", *data.glob("relay.db*")):
        assert b"PRIVATE KEY" not in path.read_bytes(), f"a PEM private key in the bytes of {path.name}"
    someone_else = SealingKey.load_or_create(tmp_path / "guess.key")
    for kid, stored in rows:
        assert stored.startswith("sealed:")
        sealed = base64.b64decode(stored.removeprefix("sealed:"))
        with pytest.raises(SealBroken):
            someone_else.open(sealed, f"issuer-key/{kid}")
        for candidate in (stored.encode(), sealed):
            with pytest.raises(ValueError):
                serialization.load_pem_private_key(candidate, None)
            with pytest.raises(ValueError):
                serialization.load_der_private_key(candidate, None)


def test_tokens_signed_with_anything_from_a_stolen_database_are_refused(relay, tmp_path):
    chain = relay.chain
    assert dial_status(chain, chain.cluster, relay.token)[0] == grpc.StatusCode.UNAVAILABLE  # admitted; no agent
    claims = jwt.decode(relay.token, options={"verify_signature": False})
    claims.update(iat=int(time.time()), nbf=int(time.time()), exp=int(time.time()) + 300)
    with closing(_stolen_copy(relay, tmp_path)) as stolen:
        rows = _signing_keys(stolen)
    forged = []
    for kid, stored in rows:
        forged.append(jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                                 headers={"kid": kid}))
        try:  # what a thief tries first: the stored value as the key
            key = serialization.load_pem_private_key(stored.encode(), None)
        except ValueError:
            forged.append(jwt.encode(claims, stored.encode(), algorithm="HS256", headers={"kid": kid}))
        else:
            forged.append(jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid}))
    for token in forged:
        code, details = dial_status(chain, chain.cluster, token)
        assert code in REFUSED, (code, details)


def test_plaintext_keys_of_an_earlier_version_are_sealed_on_start(tmp_path):
    db = tmp_path / "relay.db"
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    kid = public_jwk(private)["kid"]
    with closing(sqlite3.connect(db)) as old:  # the table as the previous version wrote it
        old.executescript("CREATE TABLE issuer_keys (kid TEXT PRIMARY KEY, private_pem TEXT NOT NULL,"
                          " created_unix INTEGER NOT NULL, activated_unix INTEGER NOT NULL DEFAULT 0,"
                          " retired_unix INTEGER NOT NULL DEFAULT 0)")
        old.execute("INSERT INTO issuer_keys VALUES (?, ?, ?, ?, 0)", (kid, pem, int(time.time()), int(time.time())))
        old.commit()
    sealing = SealingKey.load_or_create(tmp_path / "sealing.key")

    async def start(key: SealingKey) -> None:
        store = await Store.open(SqliteKV(db))
        try:
            keys = await SigningKeys.open(store, key, max_age=0, legacy_db=db)
            assert (await keys.current()).kid == kid  # the same key signs on, sealed now, in the store
        finally:
            await store.close()

    asyncio.run(start(sealing))
    with closing(sqlite3.connect(db)) as copy:
        assert dict(_signing_keys(copy))[kid].startswith("sealed:")
        assert copy.execute("SELECT COUNT(*) FROM issuer_keys").fetchone()[0] == 0  # wiped once imported
    for path in tmp_path.glob("relay.db*"):
        assert b"PRIVATE KEY" not in path.read_bytes(), f"plaintext left in {path.name}"
    with pytest.raises(SealBroken):  # and only that sealing key opens it
        asyncio.run(start(SealingKey.load_or_create(tmp_path / "other.key")))


def _serve(data_dir, *args: str) -> subprocess.CompletedProcess:
    ports = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    return subprocess.run([script("clusterconnect-relay"), "serve", "--data-dir", str(data_dir), "--listen", ports[0],
                           "--agent-listen", ports[1], "--issuer-listen", ports[2], *args],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_a_relay_without_its_sealing_key_does_not_start(relay, tmp_path):
    data = tmp_path / "copy"
    (data / "pki").mkdir(parents=True)
    with closing(_stolen_copy(relay, tmp_path)) as stolen, closing(sqlite3.connect(data / "relay.db")) as copy:
        stolen.backup(copy)
    other = tmp_path / "other.key"
    SealingKey.load_or_create(other)
    wrong = _serve(data, "--sealing-key-file", str(other))
    assert wrong.returncode == 2, wrong.stderr
    assert "does not open with this relay's sealing key" in wrong.stderr.strip().splitlines()[-1], wrong.stderr
    missing = _serve(data, "--sealing-key-file", str(tmp_path / "missing.key"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr.strip().splitlines()[-1], missing.stderr
