"""Secrets at rest: private keys the relay keeps in its store are sealed with a key that is not in it.

A stolen database (SQLite file or etcd snapshot) then holds only ciphertext: no one can sign a user
token or an agent certificate with it. The sealing key lives apart from the store: a file (created
on first start, mode 600, in the data directory for the embedded default) or a mounted Kubernetes
Secret named by ``--sealing-key-file``; every replica of the relay reads the same one.

AES-256-GCM from ``cryptography`` (no crypto of our own). Each sealed value carries a version
byte, a random 96-bit nonce and the tag; the *purpose* (e.g. ``issuer-key/<kid>``) is bound as
associated data, so a sealed value moved to another key's place does not open there.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from clusterconnect.errors import StartupError, Unavailable
from clusterconnect.pki import write_private

KEY_BYTES = 32
_VERSION = b"\x01"
_NONCE_BYTES = 12


class SealBroken(Unavailable):
    """A sealed value does not open with this key: another relay's key, or the value was altered."""


class SealingKey:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise StartupError(f"sealing key must be {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)

    @classmethod
    def load_or_create(cls, path: Path, *, create: bool = True) -> SealingKey:
        """The key in ``path`` (raw bytes, or hex as a Secret's value often is); created with mode 600
        if absent and ``create``. A key file anyone else can read is refused (it would unseal all)."""
        if not path.exists():
            if not create:
                raise StartupError(f"sealing key {path} does not exist")
            write_private(path, secrets.token_bytes(KEY_BYTES).hex().encode() + b"\n")
        # Fail closed: a key others can read would unseal everything. Group read is allowed: a Kubernetes
        # Secret volume of a pod with an fsGroup is mode 0440 whatever its defaultMode (the group is the
        # pod's own), and a non-root pod cannot read the file otherwise.
        if path.stat().st_mode & 0o037:
            raise StartupError(f"sealing key {path} is readable or writable by others: chmod 600 it")
        raw = path.read_bytes().strip()
        try:
            key = bytes.fromhex(raw.decode()) if len(raw) == 2 * KEY_BYTES else raw
        except (UnicodeDecodeError, ValueError):
            key = raw
        return cls(key)

    def seal(self, plaintext: bytes, purpose: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, purpose.encode())

    def open(self, sealed: bytes, purpose: str) -> bytes:
        if sealed[:1] != _VERSION or len(sealed) < 1 + _NONCE_BYTES + 16:
            raise SealBroken(f"{purpose}: not a sealed value")
        nonce, body = sealed[1:1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES:]
        try:
            return self._aead.decrypt(nonce, body, purpose.encode())
        except InvalidTag:
            raise SealBroken(f"{purpose}: does not open with this relay's sealing key") from None

