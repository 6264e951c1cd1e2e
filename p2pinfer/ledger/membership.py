"""Network membership: the owner key, certificates, removals and join tokens.

A *network* is defined by its **owner key**, an Ed25519 key kept in
``<home>/owner.key`` (mode 0600, created with ``O_EXCL``) on the machine
that created it, and never the node key. The network id is derived from the
owner's public key (:func:`network_id_for`), so anyone holding the id and a
public key can check they belong together.

The owner signs two kinds of documents:

- a **certificate** ``{t: "cert", v, net, peer, roles, iat, exp}``: the node
  with peer id ``peer`` is a member with these *grants* until ``exp``. A
  grant is a node role (``auth``, ``gateway``, ``inference``, ``metrics``,
  ``web``: the role may run there, and what the role does other members let
  it do) or ``operator``: the key may act for the network's operator
  (administer users, read metrics and the audit trail). Being a member
  alone permits little: each member-only method names the grants it needs
  (the capability table in docs/security.md);
- a **removal** ``{t: "removal", v, net, peer, after, iat}``: the node's
  events with ``seq > after`` are void (those up to ``after`` stay valid, so
  every node cuts the removed author's history at the same place).

Documents are self-authenticating, so any node may carry them: inside
``member.admitted`` / ``member.removed`` events, in the ``ledgerHello`` RPC,
or in a join token. The membership is a function of the *set* of documents
known (certificates add roles; several removals take the lowest ``after``),
so it converges whatever order documents arrive in. Roles only grow: to take
roles away, remove the node (its peer id can never rejoin) and admit a new key.

Files under the node home:

- ``network.json``: network id, owner public key (hex), name, bootstrap
  addresses: written when the network is created or a join token imported;
- ``owner.key``: only on the owner's machine;
- ``member.cert``: this node's own certificate (a ``p2pc1.`` string).

A **join token** is ``"p2pj1." + base64url(msgpack({net, owner, cert,
bootstrap}))``: everything a new node needs to join (:func:`make_join_token`,
:func:`import_join_token`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import (
    BadSignature,
    ConfigError,
    InvalidEvent,
    InvalidParams,
    KindNotAllowed,
    UnauthorizedAuthor,
    WrongNetwork,
)
from ..grants import GRANTS, OPERATOR
from ..identity import Identity, public_key_from_peer_id, verify, write_secret_file
from ..wire import canonical_pack, pack, unpack
from .events import KIND_ROLES, MEMBER_KINDS

__all__ = [
    "GRANTS",
    "OPERATOR",
    "NETWORK_FILE",
    "OWNER_KEY_FILE",
    "MEMBER_CERT_FILE",
    "NetworkInfo",
    "Owner",
    "SignedDoc",
    "Certificate",
    "Removal",
    "Membership",
    "MemberInfo",
    "network_id_for",
    "create_network",
    "load_network",
    "load_owner",
    "admit",
    "make_removal",
    "make_join_token",
    "parse_join_token",
    "import_join_token",
    "save_member_cert",
    "load_member_cert",
    "encode_cert",
    "decode_cert",
    "parse_doc",
]

log = logging.getLogger(__name__)

NETWORK_FILE = "network.json"
OWNER_KEY_FILE = "owner.key"
MEMBER_CERT_FILE = "member.cert"
DOC_VERSION = 1
TOKEN_PREFIX = "p2pj1."
CERT_PREFIX = "p2pc1."
DEFAULT_CERT_DAYS = 365


def network_id_for(owner_public_key: bytes) -> str:
    """The network id of an owner key: ``p2p-`` and 26 base32 characters."""
    digest = hashlib.sha256(b"p2pinfer/network/v1" + owner_public_key).digest()
    return "p2p-" + base64.b32encode(digest[:16]).decode("ascii").rstrip("=").lower()


@dataclass(frozen=True)
class NetworkInfo:
    """What identifies a network: its id and owner public key."""

    network_id: str
    owner_public_key: bytes
    name: str = ""
    bootstrap: tuple[str, ...] = ()
    created_at: float = 0.0

    def __post_init__(self) -> None:
        if network_id_for(self.owner_public_key) != self.network_id:
            raise ConfigError(f"network id {self.network_id!r} does not match its owner key")

    def to_json(self) -> dict[str, Any]:
        return {
            "network_id": self.network_id,
            "owner_public_key": self.owner_public_key.hex(),
            "name": self.name,
            "bootstrap": list(self.bootstrap),
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, data: Any) -> NetworkInfo:
        try:
            return cls(
                network_id=str(data["network_id"]),
                owner_public_key=bytes.fromhex(data["owner_public_key"]),
                name=str(data.get("name", "")),
                bootstrap=tuple(str(a) for a in data.get("bootstrap", [])),
                created_at=float(data.get("created_at", 0.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{NETWORK_FILE}: malformed ({exc})") from exc

    def save(self, home: Path) -> Path:
        """Write ``<home>/network.json`` atomically."""
        path = home / NETWORK_FILE
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, path)
        return path


# --- signed documents ----------------------------------------------------------
@dataclass(frozen=True)
class SignedDoc:
    """An owner-signed payload as it travels: ``{"doc": {...}, "sig": bytes}``."""

    doc: dict[str, Any]
    sig: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"doc": self.doc, "sig": self.sig}

    @property
    def hash(self) -> bytes:
        return hashlib.sha256(canonical_pack(self.doc) + self.sig).digest()


@dataclass(frozen=True)
class Certificate:
    """An admission: ``peer`` holds ``roles`` until ``exp`` (epoch seconds)."""

    peer: str
    roles: frozenset[str]
    iat: int
    exp: int
    signed: SignedDoc = field(repr=False, compare=False)


@dataclass(frozen=True)
class Removal:
    """A removal: events of ``peer`` with ``seq > after`` are void."""

    peer: str
    after: int
    iat: int
    signed: SignedDoc = field(repr=False, compare=False)


def _int(doc: dict[str, Any], key: str, minimum: int = 0) -> int:
    value = doc.get(key)
    if type(value) is not int or not minimum <= value < 2**62:
        raise InvalidEvent(f"document field {key!r} must be an integer >= {minimum}")
    return value


def parse_doc(wire: Any, network: NetworkInfo) -> Certificate | Removal:
    """Verify an owner-signed document.

    Raises:
        InvalidEvent: malformed; WrongNetwork: for another network;
        BadSignature: not signed by this network's owner.
    """
    if (not isinstance(wire, dict) or not isinstance(wire.get("doc"), dict)
            or not isinstance(wire.get("sig"), bytes)):
        raise InvalidEvent("a signed document is {doc: map, sig: bytes}")
    doc, sig = wire["doc"], wire["sig"]
    if doc.get("v") != DOC_VERSION:
        raise InvalidEvent(f"unsupported document version {doc.get('v')!r}")
    if doc.get("net") != network.network_id:
        raise WrongNetwork(f"document of network {str(doc.get('net'))[:64]!r}")
    peer = doc.get("peer")
    try:
        if not isinstance(peer, str):
            raise InvalidParams("peer must be a string")
        public_key_from_peer_id(peer)
    except InvalidParams as exc:
        raise InvalidEvent(f"document names no valid peer id: {exc}") from exc
    kind = doc.get("t")
    if kind == "cert":
        expected = {"t", "v", "net", "peer", "roles", "iat", "exp"}
    elif kind == "removal":
        expected = {"t", "v", "net", "peer", "after", "iat"}
    else:
        raise InvalidEvent(f"unknown document type {str(kind)[:32]!r}")
    if set(doc) != expected:
        raise InvalidEvent(f"{kind} fields must be {sorted(expected)}")
    if not verify(network.owner_public_key, canonical_pack(doc), sig):
        raise BadSignature(f"{kind} for {peer} is not signed by the network owner")
    signed = SignedDoc(doc, sig)
    if kind == "cert":
        roles = doc["roles"]
        if (not isinstance(roles, list) or not all(r in GRANTS for r in roles)
                or len(set(roles)) != len(roles)):
            raise InvalidEvent(f"certificate roles must be distinct names from {GRANTS}")
        iat, exp = _int(doc, "iat"), _int(doc, "exp")
        if exp <= iat:
            raise InvalidEvent("certificate expires before it is issued")
        return Certificate(peer, frozenset(roles), iat, exp, signed)
    return Removal(peer, _int(doc, "after"), _int(doc, "iat"), signed)


# --- the owner ---------------------------------------------------------------
class Owner:
    """The network owner's key: signs certificates and removals."""

    def __init__(self, identity: Identity, network: NetworkInfo) -> None:
        if identity.public_key != network.owner_public_key:
            raise ConfigError("the owner key does not match network.json")
        self.identity = identity
        self.network = network

    def sign(self, doc: dict[str, Any]) -> SignedDoc:
        return SignedDoc(doc, self.identity.sign(canonical_pack(doc)))


def create_network(home: Path, *, name: str = "", bootstrap: Sequence[str] = ()) -> Owner:
    """Create a new network owned by a fresh key in ``<home>/owner.key``.

    Raises:
        ConfigError: ``home`` already belongs to a network.
    """
    if (home / NETWORK_FILE).exists():
        raise ConfigError(f"{home / NETWORK_FILE} exists: this home already has a network")
    seed = Identity.generate().seed
    try:
        write_secret_file(home / OWNER_KEY_FILE, seed)
    except FileExistsError:
        raise ConfigError(f"{home / OWNER_KEY_FILE} exists; refusing to overwrite it") from None
    identity = Identity(seed)
    network = NetworkInfo(network_id_for(identity.public_key), identity.public_key,
                          name=name, bootstrap=tuple(bootstrap), created_at=time.time())
    network.save(home)
    return Owner(identity, network)


def load_network(home: Path) -> NetworkInfo | None:
    """``<home>/network.json``, or None if this home has no network yet."""
    path = home / NETWORK_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from exc
    return NetworkInfo.from_json(data)


def load_owner(home: Path) -> Owner | None:
    """The owner key of this home's network, if this machine holds it."""
    network = load_network(home)
    if network is None or not (home / OWNER_KEY_FILE).exists():
        return None
    return Owner(Identity.load_or_create(home, name=OWNER_KEY_FILE), network)


def admit(owner: Owner, peer_id: str, roles: Iterable[str], *,
          days: float = DEFAULT_CERT_DAYS, now: float | None = None) -> SignedDoc:
    """Sign a certificate admitting ``peer_id`` with ``roles`` (grants, see
    :data:`GRANTS`) for ``days``.

    Raises:
        InvalidParams: unknown grant or not a peer id.
    """
    role_list = sorted(set(roles))
    for role in role_list:
        if role not in GRANTS:
            raise InvalidParams(f"unknown role {role!r} (known: {', '.join(GRANTS)})")
    public_key_from_peer_id(peer_id)
    iat = int(now if now is not None else time.time())
    doc = {"t": "cert", "v": DOC_VERSION, "net": owner.network.network_id, "peer": peer_id,
           "roles": role_list, "iat": iat, "exp": iat + max(1, int(days * 86400))}
    return owner.sign(doc)


def make_removal(owner: Owner, peer_id: str, after: int, *,
                 now: float | None = None) -> SignedDoc:
    """Sign the removal of ``peer_id``; its events with ``seq > after`` become void."""
    public_key_from_peer_id(peer_id)
    if after < 0:
        raise InvalidParams("after must be >= 0")
    doc = {"t": "removal", "v": DOC_VERSION, "net": owner.network.network_id, "peer": peer_id,
           "after": after, "iat": int(now if now is not None else time.time())}
    return owner.sign(doc)


# --- tokens and files --------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_cert(cert: SignedDoc) -> str:
    return CERT_PREFIX + _b64(canonical_pack(cert.to_wire()))


def decode_cert(text: str) -> SignedDoc:
    """Parse a ``p2pc1.`` string (the signature is checked by :func:`parse_doc`)."""
    if not text.startswith(CERT_PREFIX):
        raise ConfigError(f"not a p2pinfer certificate (expected {CERT_PREFIX}...)")
    try:
        wire = unpack(_unb64(text[len(CERT_PREFIX):].strip()))
        return SignedDoc(dict(wire["doc"]), bytes(wire["sig"]))
    except Exception as exc:
        raise ConfigError(f"malformed certificate: {type(exc).__name__}") from exc


def make_join_token(network: NetworkInfo, cert: SignedDoc,
                    bootstrap: Sequence[str] = ()) -> str:
    """The string a new node imports to join: network id, owner public key,
    its certificate and optional bootstrap addresses."""
    payload = {"net": network.network_id, "owner": network.owner_public_key,
               "cert": cert.to_wire(), "bootstrap": list(bootstrap or network.bootstrap)}
    return TOKEN_PREFIX + _b64(pack(payload))


def parse_join_token(token: str) -> tuple[NetworkInfo, Certificate]:
    """Decode and verify a join token.

    Raises:
        ConfigError: malformed, or the certificate is not the owner's.
    """
    token = token.strip()
    if not token.startswith(TOKEN_PREFIX):
        raise ConfigError(f"not a p2pinfer join token (expected {TOKEN_PREFIX}...)")
    try:
        payload = unpack(_unb64(token[len(TOKEN_PREFIX):]))
        network = NetworkInfo(str(payload["net"]), bytes(payload["owner"]),
                              bootstrap=tuple(str(a) for a in payload.get("bootstrap", [])),
                              created_at=time.time())
        cert = parse_doc(payload["cert"], network)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"malformed join token: {exc}") from exc
    if not isinstance(cert, Certificate):
        raise ConfigError("the join token holds no certificate")
    return network, cert


def import_join_token(home: Path, token: str, *, peer_id: str | None = None) -> NetworkInfo:
    """Make ``home`` a member of the token's network: writes ``network.json``
    and ``member.cert``.

    Raises:
        ConfigError: bad token, a certificate for another peer id, or a home
            that already belongs to a different network.
    """
    network, cert = parse_join_token(token)
    if peer_id is not None and cert.peer != peer_id:
        raise ConfigError(f"the join token admits {cert.peer}, but this node is {peer_id}")
    existing = load_network(home)
    if existing is not None and existing.network_id != network.network_id:
        raise ConfigError(
            f"{home} already belongs to network {existing.network_id}; "
            f"the token is for {network.network_id}"
        )
    network.save(home)
    save_member_cert(home, cert.signed)
    return network


def save_member_cert(home: Path, cert: SignedDoc) -> Path:
    path = home / MEMBER_CERT_FILE
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(encode_cert(cert) + "\n")
    os.replace(tmp, path)
    return path


def load_member_cert(home: Path) -> SignedDoc | None:
    path = home / MEMBER_CERT_FILE
    try:
        return decode_cert(path.read_text().strip())
    except FileNotFoundError:
        return None


# --- the membership view -------------------------------------------------------------
@dataclass(frozen=True)
class MemberInfo:
    """One peer as the membership sees it."""

    peer_id: str
    roles: frozenset[str]
    admitted_at: int
    expires_at: int
    removed_after: int | None

    def active(self, now: float) -> bool:
        return self.removed_after is None and self.expires_at >= now


@dataclass
class _PeerState:
    certs: list[Certificate] = field(default_factory=list)
    removed_after: int | None = None


class Membership:
    """The set of owner-signed documents known, and what follows from it.

    All answers are in-memory lookups: :meth:`is_member` runs on every
    member-only RPC call.
    """

    def __init__(self, network: NetworkInfo) -> None:
        self.network = network
        self._docs: dict[bytes, SignedDoc] = {}
        self._peers: dict[str, _PeerState] = {}
        self._digest: bytes | None = None

    def add(self, wire: Any) -> tuple[str, int | None] | None:
        """Verify and add a document. Returns ``(peer, new cutoff)`` when the
        document changed that peer's standing (cutoff ``None`` for a new
        certificate), or ``None`` if it was already known.

        Raises:
            InvalidEvent, WrongNetwork, BadSignature: see :func:`parse_doc`.
        """
        if isinstance(wire, SignedDoc):
            wire = wire.to_wire()
        parsed = parse_doc(wire, self.network)
        key = parsed.signed.hash
        if key in self._docs:
            return None
        self._docs[key] = parsed.signed
        self._digest = None
        state = self._peers.setdefault(parsed.peer, _PeerState())
        if isinstance(parsed, Certificate):
            state.certs.append(parsed)
            return (parsed.peer, None)
        if state.removed_after is None or parsed.after < state.removed_after:
            state.removed_after = parsed.after
            return (parsed.peer, parsed.after)
        return None

    def knows(self, wire: Any) -> bool:
        try:
            return SignedDoc(wire["doc"], wire["sig"]).hash in self._docs
        except (KeyError, TypeError):
            return False

    def docs(self) -> list[SignedDoc]:
        return [self._docs[k] for k in sorted(self._docs)]

    def docs_of(self, peer_id: str) -> list[SignedDoc]:
        state = self._peers.get(peer_id)
        if state is None:
            return []
        out = [c.signed for c in state.certs]
        out.extend(d for d in self._docs.values()
                   if d.doc.get("t") == "removal" and d.doc.get("peer") == peer_id)
        return out

    def digest(self) -> bytes:
        """A hash of the whole document set: equal digests, equal membership."""
        if self._digest is None:
            h = hashlib.sha256()
            for key in sorted(self._docs):
                h.update(key)
            self._digest = h.digest()
        return self._digest

    def is_member(self, peer_id: str, now: float | None = None) -> bool:
        state = self._peers.get(peer_id)
        if state is None or state.removed_after is not None:
            return False
        t = time.time() if now is None else now
        return any(c.exp >= t for c in state.certs)

    def cutoff(self, peer_id: str) -> int | None:
        """The last valid seq of a removed peer (None if not removed)."""
        state = self._peers.get(peer_id)
        return None if state is None else state.removed_after

    def roles(self, peer_id: str, at: float | None = None) -> frozenset[str]:
        """Roles ``peer_id`` holds at time ``at`` (now by default)."""
        state = self._peers.get(peer_id)
        if state is None:
            return frozenset()
        t = time.time() if at is None else at
        out: set[str] = set()
        for cert in state.certs:
            if cert.exp >= t:
                out |= cert.roles
        return frozenset(out)

    def grants(self, peer_id: str, now: float | None = None) -> frozenset[str]:
        """What ``peer_id`` may do now: the grants of its unexpired
        certificates, none if it is not a member or was removed."""
        state = self._peers.get(peer_id)
        if state is None or state.removed_after is not None:
            return frozenset()
        return self.roles(peer_id, now)

    def check_author(self, author: str, kind: str, seq: int, at: float) -> None:
        """May ``author`` write event ``seq`` of ``kind`` stamped at ``at``?

        Raises:
            UnauthorizedAuthor: not a member, removed before ``seq``, or its
                certificates had expired at ``at``.
            KindNotAllowed: a member whose roles do not include the kind.
        """
        state = self._peers.get(author)
        if state is None or not state.certs:
            raise UnauthorizedAuthor(f"{author} is not a member of {self.network.network_id}")
        if state.removed_after is not None and seq > state.removed_after:
            raise UnauthorizedAuthor(
                f"{author} was removed; its events after #{state.removed_after} are void"
            )
        valid = [c for c in state.certs if c.exp >= at]
        if not valid:
            raise UnauthorizedAuthor(f"the certificate of {author} had expired at {at:.0f}")
        if kind in MEMBER_KINDS:
            return
        roles: set[str] = set()
        for cert in valid:
            roles |= cert.roles
        allowed = KIND_ROLES[kind]
        if not roles & allowed:
            raise KindNotAllowed(
                f"{author} (roles: {', '.join(sorted(roles)) or 'none'}) may not write "
                f"{kind} (needs {' or '.join(sorted(allowed))})"
            )

    def info(self, peer_id: str) -> MemberInfo | None:
        state = self._peers.get(peer_id)
        if state is None or not state.certs:
            return None
        roles: set[str] = set()
        for cert in state.certs:
            roles |= cert.roles
        return MemberInfo(peer_id, frozenset(roles), min(c.iat for c in state.certs),
                          max(c.exp for c in state.certs), state.removed_after)

    def members(self) -> list[MemberInfo]:
        """Every peer with a certificate, removed ones included, by peer id."""
        out = [self.info(p) for p in sorted(self._peers)]
        return [m for m in out if m is not None]


def short(peer_id: str) -> str:
    """A short form of a peer id for logs."""
    return peer_id[-8:] if len(peer_id) > 8 else peer_id
