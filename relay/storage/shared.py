"""Identity material every replica shares, made once in the store: the relay CA, the agent CA, the
admin credential. Whichever replica starts first creates each (create-if-absent); the others use it,
so every replica verifies what any replica issued. Private keys and the credential are sealed
(relay/storage/sealing.py), bound to their key as purpose: a stolen store holds only ciphertext.

A data directory of an earlier version has them as files (DATA_DIR/pki/ca.key, agent-ca.key,
admin.credential): on the first start they are imported instead of making new ones, so agents and
admins keep working. The files are left where they were.

``check_sealing_key`` guards all of it: a sealed canary, made once, that a replica started with
another key cannot open, and refuses to start on.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Callable
from pathlib import Path

from clusterconnect.errors import StartupError
from clusterconnect.logs import get_logger
from clusterconnect.pki import KeyPair
from clusterconnect.relay.storage.sealing import SealBroken, SealingKey
from clusterconnect.relay.storage.store import Store, decode, encode

log = get_logger(__name__)

CANARY = "meta/sealing-canary"


def _refused(exc: SealBroken) -> StartupError:
    return StartupError(f"{exc} (--sealing-key-file must be the same key file at every replica of this store)")


async def _created_once(store: Store, key: str, make: Callable[[], bytes]) -> bytes:
    """The value of ``key``, created with ``make()`` if absent; another replica's if it won the race."""
    current = store.get(key)
    if current is None and not await store.create(key, make()):
        current = await store.read(key)  # another replica created it just now
    current = current or store.get(key)
    if current is None:
        raise StartupError(f"the store lost {key} while it was being created; start again")
    return current.value


async def check_sealing_key(store: Store, sealing: SealingKey) -> None:
    """Refuse (StartupError, one line) a sealing key other than the one this store was sealed with."""
    sealed = await _created_once(store, CANARY, lambda: encode(
        {"sealed": base64.b64encode(sealing.seal(secrets.token_bytes(16), CANARY)).decode()}))
    try:
        sealing.open(_sealed_field(sealed, CANARY), CANARY)
    except SealBroken as exc:
        raise _refused(exc) from None


def _sealed_field(value: bytes, key: str, name: str = "sealed") -> bytes:
    document = decode(value) or {}
    try:
        return base64.b64decode(str(document[name]), validate=True)
    except (KeyError, binascii.Error):
        raise StartupError(f"the store's {key} record is unreadable") from None


async def key_pair(store: Store, sealing: SealingKey, key: str, legacy: tuple[Path, Path],
                   make: Callable[[], KeyPair]) -> KeyPair:
    """A CA (certificate and sealed private key) kept at ``key``: made once, or imported from the
    earlier version's files ``legacy`` (certificate, key) when both exist."""
    def first() -> bytes:
        crt, private = legacy
        if crt.exists() and private.exists():
            pair = KeyPair(crt.read_bytes(), private.read_bytes())
            log.info("key imported into the store", key=key, source=str(private))
        else:
            pair = make()
        return encode({"cert_pem": pair.cert_pem.decode(),
                       "key_sealed": base64.b64encode(sealing.seal(pair.key_pem, key)).decode()})

    value = await _created_once(store, key, first)
    try:
        private = sealing.open(_sealed_field(value, key, "key_sealed"), key)
    except SealBroken as exc:
        raise _refused(exc) from None
    cert = (decode(value) or {}).get("cert_pem")
    if not isinstance(cert, str):
        raise StartupError(f"the store's {key} record is unreadable")
    return KeyPair(cert.encode(), private)


async def secret(store: Store, sealing: SealingKey, key: str, legacy: Path) -> str:
    """A random secret (a credential) kept sealed at ``key``: made once, or imported from ``legacy``."""
    def first() -> bytes:
        if legacy.exists():
            value = legacy.read_text().strip()
            log.info("credential imported into the store", key=key, source=str(legacy))
        else:
            value = secrets.token_urlsafe(32)
        return encode({"sealed": base64.b64encode(sealing.seal(value.encode(), key)).decode()})

    stored = await _created_once(store, key, first)
    try:
        return sealing.open(_sealed_field(stored, key), key).decode()
    except SealBroken as exc:
        raise _refused(exc) from None
