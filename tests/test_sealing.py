"""Sealed secrets at rest (relay/storage/sealing.py): pure, no sockets."""

from __future__ import annotations

import pytest

from clusterconnect.errors import StartupError
from clusterconnect.relay.storage.sealing import KEY_BYTES, SealBroken, SealingKey


def test_key_file_is_created_once_with_mode_600_and_reused(tmp_path):
    path = tmp_path / "sealing.key"
    first = SealingKey.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    sealed = first.seal(b"private key", "issuer-key/k1")
    assert b"private key" not in sealed
    assert SealingKey.load_or_create(path).open(sealed, "issuer-key/k1") == b"private key"


def test_a_value_opens_only_with_its_key_and_in_its_place(tmp_path):
    key = SealingKey.load_or_create(tmp_path / "a.key")
    other = SealingKey.load_or_create(tmp_path / "b.key")
    sealed = key.seal(b"secret", "agent-ca")
    with pytest.raises(SealBroken, match="does not open"):
        other.open(sealed, "agent-ca")
    with pytest.raises(SealBroken, match="does not open"):
        key.open(sealed, "issuer-key/k2")  # moved to another key's place
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SealBroken):
        key.open(tampered, "agent-ca")
    with pytest.raises(SealBroken, match="not a sealed value"):
        key.open(b"plain", "agent-ca")
    assert key.seal(b"secret", "agent-ca") != sealed  # a fresh nonce every time


def test_key_files_that_fail_closed(tmp_path):
    loose = tmp_path / "loose.key"
    loose.write_text("00" * KEY_BYTES)
    for mode in (0o644, 0o604, 0o660):  # world-readable, or writable by the group
        loose.chmod(mode)
        with pytest.raises(StartupError, match="readable or writable by others"):
            SealingKey.load_or_create(loose)
    loose.chmod(0o440)  # a Kubernetes Secret volume with an fsGroup: the pod's group may read it
    assert SealingKey.load_or_create(loose).seal(b"x", "p")
    with pytest.raises(StartupError, match="does not exist"):
        SealingKey.load_or_create(tmp_path / "missing.key", create=False)
    short = tmp_path / "short.key"
    short.write_text("abcd")
    short.chmod(0o600)
    with pytest.raises(StartupError, match="32 bytes"):
        SealingKey.load_or_create(short)
    raw = tmp_path / "raw.key"
    raw.write_bytes(b"k" * KEY_BYTES)
    raw.chmod(0o600)
    assert SealingKey.load_or_create(raw).open(SealingKey(b"k" * KEY_BYTES).seal(b"x", "p"), "p") == b"x"
