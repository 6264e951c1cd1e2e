"""API keys: format, generation and hashing (sans-IO).

A key is ``p2p_<public_id>_<secret>``, 60 ASCII characters:

- ``public_id``: 12 characters of ``a-z0-9`` (62 bits), drawn with
  :mod:`secrets`; stored in clear in the ledger (``api_keys.public_id``,
  indexed) so a gateway finds the key's row with one query. It is an
  identifier, not a secret: listings show it.
- ``secret``: 32 bytes from :func:`secrets.token_bytes` (256 bits), base64url
  without padding (43 characters).

The key is shown once, when it is issued; the ledger keeps only
``key_hash = "sha256:" + hex(SHA-256("p2pinfer/apikey/v1:" + key))``.
A plain, fast hash is the right tool here, unlike for passwords: argon2's
cost exists to slow down guessing of *low-entropy* secrets, but guessing a
256-bit random secret is out of reach however fast each guess is, so a slow
hash would only cost every request ~40 ms and buy nothing. It also means no
node needs a shared secret (an HMAC key would have to be on every gateway,
where it protects nothing more). The hash covers the whole key, public id
included, and is compared with :func:`hmac.compare_digest` (constant time).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass

__all__ = [
    "KEY_PREFIX",
    "KEY_LENGTH",
    "IssuedKey",
    "generate_key",
    "parse_key",
    "hash_key",
    "key_matches",
]

KEY_PREFIX = "p2p_"
PUBLIC_ID_LENGTH = 12
SECRET_BYTES = 32
_SECRET_CHARS = 43  # base64url of 32 bytes, unpadded
KEY_LENGTH = len(KEY_PREFIX) + PUBLIC_ID_LENGTH + 1 + _SECRET_CHARS
_PUBLIC_ALPHABET = string.ascii_lowercase + string.digits
_KEY = re.compile(rf"p2p_([a-z0-9]{{{PUBLIC_ID_LENGTH}}})_[A-Za-z0-9_-]{{{_SECRET_CHARS}}}")
_HASH_PREFIX = "sha256:"
_DOMAIN = b"p2pinfer/apikey/v1:"


@dataclass(frozen=True)
class IssuedKey:
    """A freshly generated key: ``key`` is the only copy of the secret."""

    key: str
    public_id: str
    key_hash: str

    def __repr__(self) -> str:  # never print the secret by accident
        return f"IssuedKey(public_id={self.public_id!r})"


def generate_key() -> IssuedKey:
    """A new random key with its public id and hash."""
    public_id = "".join(secrets.choice(_PUBLIC_ALPHABET) for _ in range(PUBLIC_ID_LENGTH))
    secret = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=").decode()
    key = f"{KEY_PREFIX}{public_id}_{secret}"
    return IssuedKey(key, public_id, hash_key(key))


def parse_key(key: object) -> str | None:
    """The public id of a well-formed key, or None if ``key`` is malformed."""
    if type(key) is not str or len(key) != KEY_LENGTH:
        return None
    m = _KEY.fullmatch(key)
    return m.group(1) if m else None


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return _HASH_PREFIX + hashlib.sha256(_DOMAIN + key.encode()).hexdigest()


def key_matches(key: str, key_hash: str) -> bool:
    """Whether ``key`` hashes to ``key_hash`` (constant-time comparison)."""
    # bytes: compare_digest refuses non-ASCII str, and a stored hash is data
    return hmac.compare_digest(hash_key(key).encode(), key_hash.encode())
