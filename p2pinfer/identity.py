"""Node identity: a persistent Ed25519 key, its libp2p peer id, sign and verify.

The key is stored as a raw 32-byte seed in ``<home>/node.key``, created with
``O_CREAT | O_EXCL`` and mode 0600, so a restart keeps the same peer id and no
other user can read it. ``<home>`` is ``$P2PINFER_HOME`` if set, else the
platform config dir (``~/.config/p2pinfer`` on Linux).

The sign/verify helpers are shared by everything that signs bytes: ledger
events, membership certificates, node descriptors and session tokens. Peer ids
of Ed25519 keys embed the public key (an identity multihash), so a signature
can be checked from the peer id alone, with no key exchange.
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import base58
import nacl.exceptions
import nacl.signing

from .errors import ConfigError, InvalidParams

if TYPE_CHECKING:  # pragma: no cover
    from libp2p.crypto.keys import KeyPair

__all__ = [
    "Identity",
    "default_home",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "verify",
    "write_secret_file",
]

KEY_FILE = "node.key"
SEED_LEN = 32
# protobuf PublicKey{Type: Ed25519 (1), Data: <32 bytes>}, as libp2p encodes it
_ED25519_PB_PREFIX = b"\x08\x01\x12\x20"
# identity multihash (code 0x00) of the 36-byte protobuf above
_PEER_ID_PREFIX = b"\x00\x24" + _ED25519_PB_PREFIX


def default_home() -> Path:
    """The node's home directory: ``$P2PINFER_HOME`` or the platform config dir."""
    env = os.environ.get("P2PINFER_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / "p2pinfer"


def write_secret_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600; fail if it exists (never clobber a key)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def peer_id_from_public_key(public_key: bytes) -> str:
    """The base58 libp2p peer id (``12D3KooW...``) of an Ed25519 public key."""
    if len(public_key) != 32:
        raise InvalidParams("an Ed25519 public key is 32 bytes")
    return base58.b58encode(_PEER_ID_PREFIX + public_key).decode("ascii")


@functools.lru_cache(maxsize=4096)
def public_key_from_peer_id(peer_id: str) -> bytes:
    """Extract the Ed25519 public key embedded in a peer id.

    Raises:
        InvalidParams: the string is not the peer id of an Ed25519 key.
    """
    try:
        raw = base58.b58decode(peer_id.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise InvalidParams(f"not a peer id: {peer_id[:64]!r}") from exc
    if len(raw) != len(_PEER_ID_PREFIX) + 32 or not raw.startswith(_PEER_ID_PREFIX):
        raise InvalidParams(f"not the peer id of an Ed25519 key: {peer_id[:64]!r}")
    return raw[len(_PEER_ID_PREFIX) :]


@functools.lru_cache(maxsize=4096)
def _verify_key(public_key: bytes) -> nacl.signing.VerifyKey:
    return nacl.signing.VerifyKey(public_key)


def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature of ``data``."""
    if len(signature) != 64 or len(public_key) != 32:
        return False
    try:
        _verify_key(public_key).verify(data, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True


def verify_peer(peer_id: str, data: bytes, signature: bytes) -> bool:
    """True if ``signature`` over ``data`` was made by the key of ``peer_id``."""
    try:
        pub = public_key_from_peer_id(peer_id)
    except InvalidParams:
        return False
    return verify(pub, data, signature)


@dataclass(frozen=True)
class Identity:
    """An Ed25519 key pair with its peer id."""

    seed: bytes = field(repr=False)
    signing_key: nacl.signing.SigningKey = field(init=False, repr=False, compare=False)
    public_key: bytes = field(init=False)
    peer_id: str = field(init=False)

    def __post_init__(self) -> None:
        if len(self.seed) != SEED_LEN:
            raise ConfigError(f"an Ed25519 seed is {SEED_LEN} bytes, got {len(self.seed)}")
        sk = nacl.signing.SigningKey(self.seed)
        object.__setattr__(self, "signing_key", sk)
        object.__setattr__(self, "public_key", bytes(sk.verify_key))
        object.__setattr__(self, "peer_id", peer_id_from_public_key(bytes(sk.verify_key)))

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity (kept in memory only)."""
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @classmethod
    def load_or_create(cls, home: Path | None = None, *, name: str = KEY_FILE) -> Identity:
        """Load ``<home>/<name>``, creating it (0600, O_EXCL) on first use.

        Raises:
            ConfigError: the file exists but is not a 32-byte seed, or is
                readable by other users.
        """
        path = (home or default_home()) / name
        try:
            write_secret_file(path, bytes(nacl.signing.SigningKey.generate()))
        except FileExistsError:
            pass
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"{path}: key file is accessible by other users (mode {mode:o}); "
                "run: chmod 600 " + str(path)
            )
        seed = path.read_bytes()
        if len(seed) != SEED_LEN:
            raise ConfigError(f"{path}: expected a {SEED_LEN}-byte Ed25519 seed, got {len(seed)}")
        return cls(seed)

    def sign(self, data: bytes) -> bytes:
        """A 64-byte Ed25519 signature of ``data``."""
        return bytes(self.signing_key.sign(data).signature)

    def key_pair(self) -> KeyPair:
        """The same key as a py-libp2p ``KeyPair`` (imports libp2p lazily)."""
        from libp2p.crypto.ed25519 import Ed25519PrivateKey
        from libp2p.crypto.keys import KeyPair

        priv = Ed25519PrivateKey.from_bytes(self.seed)
        return KeyPair(priv, priv.get_public_key())

    def __getstate__(self) -> Any:  # pragma: no cover - identities are not pickled
        raise TypeError("Identity holds a private key and is not picklable")
