from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from p2pinfer.errors import ConfigError, InvalidParams
from p2pinfer.identity import (
    Identity,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify,
    verify_peer,
)


def test_key_file_is_private_and_stable(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path)
    path = tmp_path / "node.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 32
    assert Identity.load_or_create(tmp_path).peer_id == first.peer_id


def test_same_peer_id_across_processes(tmp_path: Path) -> None:
    code = "from p2pinfer.identity import Identity; print(Identity.load_or_create().peer_id)"
    env = {**os.environ, "P2PINFER_HOME": str(tmp_path)}
    ids = {subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() for _ in range(2)}
    assert len(ids) == 1 and next(iter(ids)).startswith("12D3KooW")


def test_refuses_world_readable_key(tmp_path: Path) -> None:
    Identity.load_or_create(tmp_path)
    os.chmod(tmp_path / "node.key", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        Identity.load_or_create(tmp_path)


def test_refuses_truncated_key(tmp_path: Path) -> None:
    (tmp_path / "node.key").write_bytes(b"short")
    os.chmod(tmp_path / "node.key", 0o600)
    with pytest.raises(ConfigError, match="32-byte"):
        Identity.load_or_create(tmp_path)


def test_peer_id_matches_libp2p() -> None:
    from libp2p.peer.id import ID

    ident = Identity.generate()
    assert ID.from_pubkey(ident.key_pair().public_key).to_base58() == ident.peer_id
    assert public_key_from_peer_id(ident.peer_id) == ident.public_key
    assert peer_id_from_public_key(ident.public_key) == ident.peer_id


def test_sign_verify() -> None:
    ident, other = Identity.generate(), Identity.generate()
    sig = ident.sign(b"hello")
    assert verify(ident.public_key, b"hello", sig)
    assert verify_peer(ident.peer_id, b"hello", sig)
    assert not verify_peer(ident.peer_id, b"hellO", sig)
    assert not verify_peer(other.peer_id, b"hello", sig)
    assert not verify_peer("not-a-peer-id", b"hello", sig)
    assert not verify(ident.public_key, b"hello", sig[:10])
    # libp2p's own signature is the same Ed25519 signature
    assert ident.key_pair().private_key.sign(b"hello") == sig


def test_bad_peer_ids() -> None:
    for bad in ["", "abc", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "0OIl"]:
        with pytest.raises(InvalidParams):
            public_key_from_peer_id(bad)
