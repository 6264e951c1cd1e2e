"""API key format, parsing and hashing (no network)."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from p2pinfer.credentials.apikeys import KEY_LENGTH, generate_key, hash_key, key_matches, parse_key


def test_generated_keys_have_the_documented_form() -> None:
    keys = [generate_key() for _ in range(200)]
    for issued in keys:
        assert len(issued.key) == KEY_LENGTH == 60
        assert issued.key.startswith(f"p2p_{issued.public_id}_")
        assert parse_key(issued.key) == issued.public_id
        assert issued.key_hash == "sha256:" + hashlib.sha256(
            b"p2pinfer/apikey/v1:" + issued.key.encode()).hexdigest()
        assert issued.key not in repr(issued)
    assert len({k.key for k in keys}) == len({k.public_id for k in keys}) == 200


def test_only_the_key_itself_matches_its_hash() -> None:
    issued = generate_key()
    assert key_matches(issued.key, issued.key_hash)
    for i in (len("p2p_") + 1, 20, KEY_LENGTH - 1):
        ch = "A" if issued.key[i] != "A" else "B"
        tampered = issued.key[:i] + ch + issued.key[i + 1:]
        assert not key_matches(tampered, issued.key_hash)
    assert not key_matches(issued.key, "sha256:" + "0" * 64)
    assert not key_matches(issued.key, "ünïcode")  # a stored hash is data: no TypeError


def test_malformed_keys_are_recognised() -> None:
    issued = generate_key()
    for bad in ("", "p2p_", issued.key[:-1], issued.key + "x", issued.key.replace("p2p_", "p2x_"),
                issued.key.upper(), " " + issued.key[1:], None, 42, issued.key.encode()):
        assert parse_key(bad) is None


@given(st.text(max_size=80))
def test_parse_never_accepts_garbage(text: str) -> None:
    public_id = parse_key(text)
    if public_id is not None:
        assert text.startswith(f"p2p_{public_id}_") and len(text) == KEY_LENGTH
        assert hash_key(text).startswith("sha256:")
