"""Ledger events: the immutable, signed unit of replication (sans-IO).

An event is the msgpack array::

    [v, network, author, seq, hlc, kind, body, sig]

- ``v``: protocol version (:data:`PROTOCOL_VERSION`);
- ``network``: the network id; events of another network are refused;
- ``author``: the peer id of the node that wrote it (its key signs it);
- ``seq``: the author's sequence number, 1, 2, 3, … with no gaps;
- ``hlc``: a hybrid-logical-clock timestamp (:mod:`.clock`);
- ``kind``: one of :data:`KINDS`; ``body``: a map whose shape depends on it;
- ``sig``: Ed25519 signature by the author's node key over
  :func:`~p2pinfer.wire.canonical_pack` of the first seven fields.

``(author, seq)`` identifies an event. Its *content hash* is the SHA-256 of
the signed bytes: the same ``(author, seq)`` with a different hash is a
replay (or an author that equivocates) and is refused.

**Redaction** (erasure in an append-only ledger): a ``user.erased`` event
lists the ``(author, seq, hash)`` of the user's ``user.registered`` events.
Every node that applies it replaces those stored events by a :class:`Stub`
(``["stub", v, network, author, seq, hlc, kind, hash]``): the sequence stays
gap-free and the content hash still detects replays, but the username, email
and password hash are gone, and stubs, not events, are what peers pull.

This module only encodes, decodes, signs and checks shapes: it never touches
the store or the network. :func:`decode` raises the ledger error that names
what is wrong: :class:`~p2pinfer.errors.InvalidEvent` (malformed),
:class:`~p2pinfer.errors.WrongNetwork`, :class:`~p2pinfer.errors.BadSignature`.

Body shapes (times are float seconds since the epoch; ids are UUID strings):

==================  ==========================================================
kind                body
==================  ==========================================================
member.admitted     ``cert``: owner-signed certificate (see :mod:`.membership`)
member.removed      ``removal``: owner-signed removal
user.registered     ``user_id, username, email, password_hash, created_at``,
                    optional ``tier`` ("default"/"premium"), ``is_active``
user.updated        ``user_id, updated_at`` and at least one of ``tier``,
                    ``is_active``, ``is_admin``, ``password_hash`` (a password
                    change), ``sessions_after`` (sessions authenticated
                    before this time are over)
user.erased         ``user_id, erased_at``, optional ``redacts``: list of
                    ``{author, seq, hash}`` of that user's registrations and
                    password changes
apikey.issued       ``key_id, user_id, public_id, key_hash, name, created_at``
apikey.revoked      ``key_id, revoked_at``
apikey.used         ``entries``: list of ``{key_id, at}`` (batched)
session.revoked     ``jti, exp``
usage               ``entries``: list of ``{user_id, key_id, hour, requests,
                    tokens}`` (counter deltas; ``hour`` = epoch seconds of
                    the UTC hour, a multiple of 3600)
request.logged      ``rows``: list of ``{id, user_id, api_key_id, prompt_hash,
                    model_used, response_time_ms, tokens_used, status,
                    created_at}`` (written by gateways before the log lane;
                    still accepted and applied, never written now)
log.requests        same body as ``request.logged``, in the *log lane* (below)
audit               ``actor, action, outcome, time``, optional ``target,
                    source, detail`` (a small map)
==================  ==========================================================

**Two lanes.** Every kind but :data:`LOG_KINDS` is in an author's *main
lane*: one gap-free sequence that every member replicates and applies.
Request logs are in the *log lane*: the same signed format, numbered in a
sequence of their own per author, kept by the author and the few members
that keep logs (see :mod:`.logs`), never gossiped. The kind is signed, so an
event of one lane can never be passed off as an event of the other.
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadSignature, InvalidEvent, WrongNetwork
from ..identity import Identity, verify_peer
from ..wire import canonical, canonical_pack, pack, unpack
from .clock import wall_of

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_EVENT_BYTES",
    "KINDS",
    "KIND_ROLES",
    "MEMBER_KINDS",
    "LOG_KINDS",
    "Event",
    "decode",
    "decode_any",
    "decode_stub",
    "decode_trusted",
    "Stub",
    "make_stub",
    "REDACTABLE_KINDS",
    "sign_event",
    "validate_body",
    "rank_of",
]

PROTOCOL_VERSION = 1
MAX_EVENT_BYTES = 256 * 1024
MAX_BATCH = 1000
TIERS = ("default", "premium")

# Which certificate roles may author which kinds. Membership kinds carry
# owner-signed documents and are valid from any member.
MEMBER_KINDS = frozenset({"member.admitted", "member.removed"})
_AUTH = frozenset({"auth"})
_GATEWAY = frozenset({"gateway"})
KIND_ROLES: dict[str, frozenset[str]] = {
    "user.registered": _AUTH,
    "user.updated": _AUTH,
    "user.erased": _AUTH,
    "apikey.issued": _AUTH,
    "apikey.revoked": _AUTH,
    "session.revoked": _AUTH,
    "audit": _AUTH,
    "apikey.used": _GATEWAY,
    "usage": _GATEWAY,
    "request.logged": _GATEWAY,
    "log.requests": _GATEWAY,
}
KINDS = frozenset(KIND_ROLES) | MEMBER_KINDS
# Kinds of the log lane (see the module docstring).
LOG_KINDS = frozenset({"log.requests"})


def rank_of(hlc: int, author: str, seq: int) -> str:
    """The total order used to break ties between events: ``(hlc, author,
    seq)`` as a string that sorts the same way (SQLite compares it as text)."""
    return f"{hlc:020d}|{author}|{seq:020d}"


@dataclass(frozen=True, slots=True)
class Event:
    """A decoded, signature-checked event. Build with :func:`sign_event` or
    :func:`decode`, never directly from untrusted data."""

    network: str
    author: str
    seq: int
    hlc: int
    kind: str
    body: dict[str, Any]
    sig: bytes = field(repr=False)
    raw: bytes = field(repr=False, compare=False)
    hash: bytes = field(repr=False, compare=False)
    v: int = PROTOCOL_VERSION

    @property
    def id(self) -> tuple[str, int]:
        return (self.author, self.seq)

    @property
    def wall(self) -> float:
        """The wall-clock time the author stamped on it (seconds)."""
        return wall_of(self.hlc)

    @property
    def rank(self) -> str:
        return rank_of(self.hlc, self.author, self.seq)


def _signed_part(v: int, network: str, author: str, seq: int, hlc: int, kind: str,
                 body: Mapping[str, Any]) -> bytes:
    return canonical_pack([v, network, author, seq, hlc, kind, body])


def _encode(v: int, network: str, author: str, seq: int, hlc: int, kind: str,
            body: Mapping[str, Any], sig: bytes | None = None) -> tuple[bytes, bytes]:
    """The signed part and, given ``sig``, the whole event, canonically
    encoded; the body is put in canonical order once for both."""
    head = [v, network, author, seq, hlc, kind, canonical(body)]
    signed = pack(head)
    return signed, (pack([*head, sig]) if sig is not None else b"")


def sign_event(identity: Identity, network: str, seq: int, hlc: int, kind: str,
               body: dict[str, Any]) -> Event:
    """Build and sign an event authored by ``identity``. The body is checked
    first (:class:`~p2pinfer.errors.InvalidEvent` if it is malformed)."""
    if kind not in KINDS:
        raise InvalidEvent(f"unknown event kind {kind!r}")
    validate_body(kind, body)
    head = [PROTOCOL_VERSION, network, identity.peer_id, seq, hlc, kind, canonical(body)]
    signed = pack(head)
    sig = identity.sign(signed)
    raw = pack([*head, sig])
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent(
            f"event of {len(raw)} bytes; at most {MAX_EVENT_BYTES} (split the batch)")
    return Event(network, identity.peer_id, seq, hlc, kind, body, sig, raw,
                 hashlib.sha256(signed).digest())


def decode(raw: bytes, network: str) -> Event:
    """Decode and check an event received from anywhere.

    Checks, in order: size and msgpack shape, protocol version, network id,
    kind, signature, body shape.

    Raises:
        InvalidEvent: malformed fields or body, unknown kind or version (or a
            redacted stub: see :func:`decode_any`).
        WrongNetwork: the event belongs to another network.
        BadSignature: the signature is not the author's.
    """
    out = decode_any(raw, network)
    if isinstance(out, Stub):
        raise InvalidEvent("a redacted stub where an event was expected")
    return out


def decode_any(raw: bytes, network: str) -> Event | Stub:
    """Like :func:`decode`, but also accepts a redacted :class:`Stub` (whose
    signature can no longer be checked: the store accepts it only if it holds
    an erasure that lists it)."""
    if not isinstance(raw, bytes | bytearray) or len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent("an event is at most 256 KiB of bytes")
    try:
        obj = unpack(bytes(raw))
    except Exception as exc:  # msgpack raises many types on garbage
        raise InvalidEvent(f"event is not valid msgpack: {type(exc).__name__}") from exc
    if isinstance(obj, list) and obj and obj[0] == STUB_TAG:
        return _stub(obj, network)
    if not isinstance(obj, list) or len(obj) != 8:
        raise InvalidEvent("an event is an array of 8 fields")
    v, net, author, seq, hlc, kind, body, sig = obj
    if v != PROTOCOL_VERSION:
        raise InvalidEvent(f"unsupported event version {v!r}")
    if not isinstance(net, str):
        raise InvalidEvent("network id must be a string")
    if net != network:
        raise WrongNetwork(f"event of network {net[:64]!r}, this is {network!r}")
    if not isinstance(author, str) or not 0 < len(author) <= 128:
        raise InvalidEvent("author must be a peer id")
    if type(seq) is not int or not 0 < seq < 2**62:
        raise InvalidEvent("seq must be a positive integer")
    if type(hlc) is not int or not 0 < hlc < 2**63:
        raise InvalidEvent("hlc must be a positive integer")
    if not isinstance(kind, str) or kind not in KINDS:
        raise InvalidEvent(f"unknown event kind {str(kind)[:64]!r}")
    if not isinstance(body, dict):
        raise InvalidEvent("body must be a map")
    if not isinstance(sig, bytes) or len(sig) != 64:
        raise InvalidEvent("sig must be 64 bytes")
    try:
        signed, whole = _encode(v, net, author, seq, hlc, kind, body, sig)
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(f"body cannot be encoded canonically: {exc}") from exc
    if not verify_peer(author, signed, sig):
        raise BadSignature(f"event {author}#{seq} is not signed by its author")
    validate_body(kind, body)
    return Event(net, author, seq, hlc, kind, body, sig, whole,
                 hashlib.sha256(signed).digest())


# --- redaction -------------------------------------------------------------------
STUB_TAG = "stub"
# Kinds that can carry personal data (a password hash counts): an erasure
# lists them, and every node replaces them with stubs.
REDACTABLE_KINDS = frozenset({"user.registered", "user.updated"})
USER_FIELDS = frozenset({"tier", "is_active", "is_admin", "password_hash", "sessions_after"})
MAX_REDACTS = 64  # events one user.erased lists; more go in further user.erased events


@dataclass(frozen=True, slots=True)
class Stub:
    """What is left of an event an erasure redacted: its place in the author's
    sequence and its content hash, without the body (so without the personal
    data) and without a verifiable signature."""

    network: str
    author: str
    seq: int
    hlc: int
    kind: str
    hash: bytes
    raw: bytes = field(repr=False, compare=False)

    @property
    def id(self) -> tuple[str, int]:
        return (self.author, self.seq)


def make_stub(network: str, author: str, seq: int, hlc: int, kind: str, digest: bytes) -> Stub:
    raw = canonical_pack([STUB_TAG, PROTOCOL_VERSION, network, author, seq, hlc, kind, digest])
    return Stub(network, author, seq, hlc, kind, digest, raw)


def _stub(obj: list[Any], network: str) -> Stub:
    if len(obj) != 8:
        raise InvalidEvent("a stub is an array of 8 fields")
    _, v, net, author, seq, hlc, kind, digest = obj
    if v != PROTOCOL_VERSION:
        raise InvalidEvent(f"unsupported event version {v!r}")
    if net != network:
        raise WrongNetwork(f"stub of network {str(net)[:64]!r}, this is {network!r}")
    if (not isinstance(author, str) or not 0 < len(author) <= 128 or type(seq) is not int
            or not 0 < seq < 2**62 or type(hlc) is not int or not 0 < hlc < 2**63
            or kind not in REDACTABLE_KINDS or not isinstance(digest, bytes)
            or len(digest) != 32):
        raise InvalidEvent("malformed stub")
    return make_stub(net, author, seq, hlc, kind, digest)


def decode_stub(raw: bytes) -> Stub:
    """Decode a stub this node stored."""
    obj = unpack(raw)
    return make_stub(obj[2], obj[3], obj[4], obj[5], obj[6], obj[7])


def decode_trusted(raw: bytes) -> Event:
    """Decode an event this node stored after checking it (no verification)."""
    v, net, author, seq, hlc, kind, body, sig = unpack(raw)
    signed = _signed_part(v, net, author, seq, hlc, kind, body)
    return Event(net, author, seq, hlc, kind, body, sig, raw, hashlib.sha256(signed).digest())


# --- body shapes ---------------------------------------------------------------
Path = str | tuple[Any, Any]  # a field's name, or (parent path, key or index)
Check = Callable[[Path, Any], Any]


def _p(name: Path) -> str:
    """A field's path for an error message; built only when one is raised
    (a request.logged batch has ~2,000 fields to check)."""
    if isinstance(name, str):
        return name
    parent, key = name
    return f"{_p(parent)}[{key}]" if isinstance(key, int) else f"{_p(parent)}.{key}"


def _str(max_len: int, min_len: int = 1, pattern: re.Pattern[str] | None = None) -> Check:
    def check(name: Path, value: Any) -> Any:
        if not isinstance(value, str) or not min_len <= len(value) <= max_len:
            raise InvalidEvent(f"{_p(name)} must be a string of {min_len}-{max_len} characters")
        if pattern is not None and not pattern.fullmatch(value):
            raise InvalidEvent(f"{_p(name)} has invalid characters")
        return value

    return check


def _optional(inner: Check) -> Check:
    def check(name: Path, value: Any) -> Any:
        return None if value is None else inner(name, value)

    return check


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _uuid(name: Path, value: Any) -> Any:
    # the form str(uuid.UUID(x)) gives, checked without building a UUID
    if not isinstance(value, str) or len(value) != 36:
        raise InvalidEvent(f"{_p(name)} must be a UUID string")
    if _UUID.fullmatch(value) is None:
        try:
            uuid.UUID(value)
        except ValueError:
            raise InvalidEvent(f"{_p(name)} must be a UUID string") from None
        raise InvalidEvent(f"{_p(name)} must be a lower-case hyphenated UUID")
    return value


def _time(name: Path, value: Any) -> Any:
    if type(value) not in (int, float) or not math.isfinite(value) or not 0 <= value < 1e11:
        raise InvalidEvent(f"{_p(name)} must be a time in seconds since the epoch")
    return value


def _count(maximum: int = 2**53) -> Check:
    def check(name: Path, value: Any) -> Any:
        if type(value) is not int or not 0 <= value <= maximum:
            raise InvalidEvent(f"{_p(name)} must be an integer between 0 and {maximum}")
        return value

    return check


def _number(name: Path, value: Any) -> Any:
    if type(value) not in (int, float) or not math.isfinite(value) or not 0 <= value < 1e12:
        raise InvalidEvent(f"{_p(name)} must be a non-negative number")
    return value


def _bool(name: Path, value: Any) -> Any:
    if not isinstance(value, bool):
        raise InvalidEvent(f"{_p(name)} must be true or false")
    return value


def _choice(*choices: str) -> Check:
    def check(name: Path, value: Any) -> Any:
        if value not in choices:
            raise InvalidEvent(f"{_p(name)} must be one of {', '.join(choices)}")
        return value

    return check


def _hour(name: Path, value: Any) -> Any:
    if type(value) is not int or value % 3600 or not 0 <= value < 1e11:
        raise InvalidEvent(f"{_p(name)} must be the epoch second of a UTC hour (multiple of 3600)")
    return value


def _digest(name: Path, value: Any) -> Any:
    if not isinstance(value, bytes) or len(value) != 32:
        raise InvalidEvent(f"{_p(name)} must be a 32-byte SHA-256 digest")
    return value


def _small_map(name: Path, value: Any) -> Any:
    if not isinstance(value, dict) or len(value) > 32:
        raise InvalidEvent(f"{_p(name)} must be a map of at most 32 entries")
    try:
        size = len(canonical_pack(value))
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(f"{_p(name)} cannot be encoded: {exc}") from exc
    if size > 4096:
        raise InvalidEvent(f"{_p(name)} must encode to at most 4096 bytes")
    return value


def _doc(name: Path, value: Any) -> Any:
    if (not isinstance(value, dict) or set(value) != {"doc", "sig"}
            or not isinstance(value["doc"], dict) or not isinstance(value["sig"], bytes)):
        raise InvalidEvent(f"{_p(name)} must be a signed document {{doc, sig}}")
    return value


def _record(fields: dict[str, Check], optional: dict[str, Check] | None = None) -> Check:
    optional = optional or {}

    def check(name: Path, value: Any) -> Any:
        _check_map(name, value, fields, optional)
        return value

    return check


def _list_of(item: Check, max_len: int = MAX_BATCH) -> Check:
    def check(name: Path, value: Any) -> Any:
        if not isinstance(value, list) or not 0 < len(value) <= max_len:
            raise InvalidEvent(f"{_p(name)} must be a list of 1-{max_len} items")
        for i, v in enumerate(value):
            item((name, i), v)
        return value

    return check


def _check_map(name: Path, value: Any, fields: dict[str, Check],
               optional: dict[str, Check]) -> None:
    if not isinstance(value, dict):
        raise InvalidEvent(f"{_p(name)} must be a map")
    for key in value:
        if key not in fields and key not in optional:
            raise InvalidEvent(f"{_p(name)}: unexpected field {str(key)[:64]!r}")
    for key, check in fields.items():
        if key not in value:
            raise InvalidEvent(f"{_p(name)}: missing field {key!r}")
        check((name, key), value[key])
    for key, check in optional.items():
        if key in value:
            check((name, key), value[key])


_PUBLIC_ID = re.compile(r"[A-Za-z0-9_-]+")
_HEX = re.compile(r"[0-9a-f]+")

_LOG_ROWS: tuple[dict[str, Check], dict[str, Check]] = (
    {"rows": _list_of(_record({
        "id": _uuid, "user_id": _optional(_uuid), "api_key_id": _optional(_uuid),
        "prompt_hash": _str(128, 8, _HEX), "model_used": _str(200),
        "response_time_ms": _number, "tokens_used": _count(), "status": _str(32),
        "created_at": _time,
    }), max_len=500)},
    {},
)

_SHAPES: dict[str, tuple[dict[str, Check], dict[str, Check]]] = {
    "member.admitted": ({"cert": _doc}, {}),
    "member.removed": ({"removal": _doc}, {}),
    "user.registered": (
        {"user_id": _uuid, "username": _str(50), "email": _str(100, 3),
         "password_hash": _str(255), "created_at": _time},
        {"tier": _choice(*TIERS), "is_active": _bool},
    ),
    "user.updated": (
        {"user_id": _uuid, "updated_at": _time},
        {"tier": _choice(*TIERS), "is_active": _bool, "is_admin": _bool,
         "password_hash": _str(255), "sessions_after": _time},
    ),
    "user.erased": (
        {"user_id": _uuid, "erased_at": _time},
        {"redacts": _list_of(_record({"author": _str(128), "seq": _count(2**62),
                                      "hash": _digest}), max_len=MAX_REDACTS)},
    ),
    "apikey.issued": (
        {"key_id": _uuid, "user_id": _uuid, "public_id": _str(32, 4, _PUBLIC_ID),
         "key_hash": _str(255), "name": _optional(_str(100, 0)), "created_at": _time},
        {},
    ),
    "apikey.revoked": ({"key_id": _uuid, "revoked_at": _time}, {}),
    "apikey.used": (
        {"entries": _list_of(_record({"key_id": _uuid, "at": _time}))},
        {},
    ),
    "session.revoked": ({"jti": _str(128), "exp": _time},
                        {"sid": _str(128), "session_exp": _time}),
    "usage": (
        {"entries": _list_of(_record({
            "user_id": _uuid, "key_id": _optional(_uuid), "hour": _hour,
            "requests": _count(), "tokens": _count(),
        }))},
        {},
    ),
    "request.logged": _LOG_ROWS,
    "log.requests": _LOG_ROWS,
    "audit": (
        {"actor": _str(200), "action": _str(64), "outcome": _str(32), "time": _time},
        {"target": _optional(_str(200)), "source": _optional(_str(200)),
         "detail": _small_map},
    ),
}


def validate_body(kind: str, body: Any) -> None:
    """Check that ``body`` has the shape ``kind`` requires.

    Raises:
        InvalidEvent: naming the first field that is wrong.
    """
    shape = _SHAPES.get(kind)
    if shape is None:
        raise InvalidEvent(f"unknown event kind {kind!r}")
    _check_map("body", body, shape[0], shape[1])
    if kind == "user.updated" and not USER_FIELDS & set(body):
        raise InvalidEvent("user.updated needs tier, is_active, is_admin, password_hash "
                           "or sessions_after")
    if kind == "session.revoked" and ("sid" in body) != ("session_exp" in body):
        raise InvalidEvent("session.revoked: a rotation gives both sid and session_exp")
