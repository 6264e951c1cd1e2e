"""Signed checkpoints of the main lane: join from state, not from history.

Every member replays the main lane (users, keys, sessions, membership,
usage totals) event by event. After months of requests that history is long:
a node that joins, or returns after a long absence, would replay all of it,
and every node would keep it for ever. A *checkpoint* is the state those
events built, exactly as of a version vector:

- the rows of the replicated tables (:data:`STATE_TABLES`: users and their
  registrations, keys, revocations, sessions, usage totals, audit rows,
  erasures), and the owner-signed membership documents;
- a header: network, maker, time, the version vector ``vv`` it covers,
  the row count and ``root``, the SHA-256 of the sorted digests of its
  rows (each the SHA-256 of the table name and the row's column map);
- the maker's Ed25519 signature over the header. Only a member granted
  ``auth`` makes checkpoints (it is the member trusted with users and keys
  already), every ``[ledger] checkpoint_events`` events.

A node more than ``[ledger] checkpoint_catchup`` events behind a peer's
checkpoint, or behind the range that peer has pruned, fetches it
(``ledgerCheckpoint``), checks the signature, the maker's grant and every
row against the root, loads the rows and pulls only the events after
``vv``. Events a node holds within a checkpoint it has kept for ``[ledger]
prune_after_days`` are deleted (*pruned*); it keeps that checkpoint as the
base it rebuilds from and serves to others.

**Erasure.** A checkpoint that holds an erased user's registration, user
row or attributes has those rows replaced by their digests as soon as the
erasure is applied: the root, and so the signature, still verify, and no
copy of the personal data remains. A node loading it applies the erasure
with the events after ``vv`` (an erasure always comes after the rows it
redacts).

RPC: ``ledgerCheckpoint {id?}`` (members) → a stream whose first item is
the header map and whose other items are the compressed body in chunks.
"""

from __future__ import annotations

import hashlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ..errors import (
    BadSignature,
    InvalidEvent,
    InvalidParams,
    P2PInferError,
    StorageError,
    UnauthorizedAuthor,
)
from ..identity import Identity, verify_peer
from ..rpc import Access, CallContext, rpc_method
from ..wire import canonical_pack, pack, unpack
from .membership import short

if TYPE_CHECKING:  # pragma: no cover
    from .ledger import Ledger

__all__ = ["Checkpoint", "CheckpointHeader", "CheckpointService", "Checkpoints",
           "STATE_TABLES", "make_checkpoint", "open_checkpoint", "redact_body"]

log = logging.getLogger(__name__)

VERSION = 1
DOMAIN = b"p2pinfer checkpoint\x00"
#: The tables a checkpoint carries: every table built from main-lane events
#: (request logs are the log lane's, kept where they are used).
STATE_TABLES: tuple[str, ...] = (
    "registrations", "user_attrs", "users", "api_keys", "key_revocations", "key_last_used",
    "usage_stats", "usage_hourly", "audit", "revoked_sessions", "erased_users", "rotations",
    "redactions", "personal_events",
)
#: Tables whose rows hold personal data, and the column naming their user.
PERSONAL: dict[str, str] = {"registrations": "user_id", "users": "id",
                            "user_attrs": "user_id"}
MAX_BODY_BYTES = 1 << 30        # uncompressed
MAX_WIRE_BYTES = 512 << 20      # compressed, as fetched
CHUNK_BYTES = 1 << 20
FETCH_TIMEOUT = 10.0            # between two chunks of a fetch
MAX_VV = 100_000


def row_digest(table: str, columns: list[str], row: list[Any]) -> bytes:
    return hashlib.sha256(canonical_pack([table, dict(zip(columns, row, strict=True))])).digest()


@dataclass(frozen=True)
class CheckpointHeader:
    """What a checkpoint claims, and its maker's signature over it."""

    network: str
    maker: str
    made_at: float
    vv: dict[str, int]
    root: bytes
    rows: int
    sig: bytes = b""

    def signed_part(self) -> bytes:
        return DOMAIN + canonical_pack([VERSION, self.network, self.maker, self.made_at,
                                        self.vv, self.root, self.rows])

    @property
    def id(self) -> bytes:
        return hashlib.sha256(self.signed_part()).digest()

    @property
    def events(self) -> int:
        """How many main-lane events it covers."""
        return sum(self.vv.values())

    def to_wire(self) -> dict[str, Any]:
        return {"v": VERSION, "net": self.network, "maker": self.maker,
                "made_at": self.made_at, "vv": self.vv, "root": self.root,
                "rows": self.rows, "sig": self.sig}

    @classmethod
    def from_wire(cls, wire: Any) -> CheckpointHeader:
        """Parse a header from a peer (InvalidParams if malformed; the
        signature is checked by :func:`open_checkpoint`)."""
        if not isinstance(wire, dict) or wire.get("v") != VERSION:
            raise InvalidParams("a checkpoint header is a map of version 1")
        net, maker, made_at, vv = wire.get("net"), wire.get("maker"), wire.get("made_at"), \
            wire.get("vv")
        root, rows, sig = wire.get("root"), wire.get("rows"), wire.get("sig")
        if not (isinstance(net, str) and isinstance(maker, str) and len(maker) <= 128
                and isinstance(made_at, float | int) and isinstance(root, bytes)
                and len(root) == 32 and type(rows) is int and rows >= 0
                and isinstance(sig, bytes) and len(sig) == 64
                and isinstance(vv, dict) and len(vv) <= MAX_VV
                and all(isinstance(a, str) and type(s) is int and s >= 0
                        for a, s in vv.items())):
            raise InvalidParams("malformed checkpoint header")
        return cls(net, maker, float(made_at), dict(vv), root, rows, sig)


@dataclass
class Checkpoint:
    """A header and its body: per table, the column names and the rows
    (each a list of values, or the 32-byte digest of a redacted row), and
    the membership documents."""

    header: CheckpointHeader
    columns: dict[str, list[str]]
    tables: dict[str, list[list[Any] | bytes]]
    docs: list[Any] = field(default_factory=list)

    def body(self) -> bytes:
        """The compressed body, as stored and sent."""
        return zlib.compress(pack({"columns": self.columns, "tables": self.tables,
                                   "docs": self.docs}), 6)


def compute_root(columns: Mapping[str, list[str]],
                 tables: Mapping[str, list[list[Any] | bytes]]) -> tuple[bytes, int]:
    digests = []
    for table, rows in tables.items():
        cols = columns[table]
        for row in rows:
            digests.append(row if isinstance(row, bytes) else row_digest(table, cols, row))
    digests.sort()
    return hashlib.sha256(b"".join(digests)).digest(), len(digests)


def make_checkpoint(identity: Identity, network: str, vv: dict[str, int],
                    columns: dict[str, list[str]], tables: dict[str, list[list[Any] | bytes]],
                    docs: list[Any], made_at: float | None = None) -> Checkpoint:
    """Sign the state ``tables`` as of ``vv`` (CPU-bound: run it in a thread)."""
    root, rows = compute_root(columns, tables)
    header = CheckpointHeader(network, identity.peer_id,
                              time.time() if made_at is None else made_at, vv, root, rows)
    header = CheckpointHeader(**{**header.__dict__, "sig": identity.sign(header.signed_part())})
    return Checkpoint(header, columns, tables, docs)


def decode_body(header: CheckpointHeader, body: bytes) -> Checkpoint:
    """Decompress and parse a body (InvalidEvent if malformed or too large)."""
    try:
        inflater = zlib.decompressobj()
        data = inflater.decompress(body, MAX_BODY_BYTES)
        if inflater.unconsumed_tail:
            raise InvalidEvent(f"checkpoint body over {MAX_BODY_BYTES} bytes")
        obj = unpack(data)
    except (zlib.error, ValueError, TypeError) as exc:
        raise InvalidEvent(f"checkpoint body does not decode: {exc}") from exc
    except InvalidEvent:
        raise
    except Exception as exc:  # msgpack raises many types on garbage
        raise InvalidEvent(f"checkpoint body does not decode: {type(exc).__name__}") from exc
    if not isinstance(obj, dict):
        raise InvalidEvent("a checkpoint body is a map")
    columns, tables, docs = obj.get("columns"), obj.get("tables"), obj.get("docs")
    if not (isinstance(columns, dict) and isinstance(tables, dict) and isinstance(docs, list)
            and set(tables) <= set(STATE_TABLES) and set(tables) <= set(columns)):
        raise InvalidEvent("malformed checkpoint body")
    for table, rows in tables.items():
        cols = columns[table]
        if not (isinstance(cols, list) and all(isinstance(c, str) for c in cols)
                and isinstance(rows, list)):
            raise InvalidEvent(f"malformed checkpoint table {table!r}")
        for row in rows:
            if isinstance(row, bytes) and len(row) == 32:
                continue
            if not isinstance(row, list) or len(row) != len(cols):
                raise InvalidEvent(f"malformed row of checkpoint table {table!r}")
    return Checkpoint(header, columns, tables, docs)


def open_checkpoint(header: CheckpointHeader, body: bytes, network: str) -> Checkpoint:
    """Check a fetched checkpoint: its network, its maker's signature and
    every row against the root (the maker's grant is the ledger's to check,
    once the documents it carries are known).

    Raises:
        InvalidEvent, BadSignature: it must not be used.
    """
    if header.network != network:
        raise InvalidEvent("a checkpoint of another network")
    if not verify_peer(header.maker, header.signed_part(), header.sig):
        raise BadSignature(f"checkpoint signature is not {short(header.maker)}'s")
    ckpt = decode_body(header, body)
    root, rows = compute_root(ckpt.columns, ckpt.tables)
    if root != header.root or rows != header.rows:
        raise InvalidEvent("checkpoint rows do not match its signed root")
    return ckpt


def redact_body(ckpt: Checkpoint, user_ids: set[str] | frozenset[str]) -> int:
    """Replace the rows holding personal data of ``user_ids`` by their
    digests (a registration already erased keeps its marker row, which
    holds none). Returns how many rows were replaced."""
    done = 0
    for table, column in PERSONAL.items():
        cols = ckpt.columns.get(table)
        rows = ckpt.tables.get(table)
        if cols is None or rows is None or column not in cols:
            continue
        at = cols.index(column)
        status = cols.index("status") if "status" in cols else None
        for i, row in enumerate(rows):
            if isinstance(row, bytes) or row[at] not in user_ids:
                continue
            if status is not None and row[status] == "erased":
                continue
            rows[i] = row_digest(table, cols, row)
            done += 1
    return done


class CheckpointService:
    """``ledgerCheckpoint``: serve this node's newest checkpoint."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    @rpc_method("ledgerCheckpoint", access=Access.MEMBER)
    async def rpc_checkpoint(self, ctx: CallContext, params: Any) -> AsyncIterator[Any]:
        """``{id?}`` → the header of this node's newest checkpoint, then its
        compressed body in chunks of 1 MiB (InvalidParams, reason
        ``no_checkpoint``, if it holds none or another than ``id``)."""
        if params is not None and not isinstance(params, dict):
            raise InvalidParams("expected a map")
        wanted = (params or {}).get("id")
        if wanted is not None and not (isinstance(wanted, bytes) and len(wanted) == 32):
            raise InvalidParams("id must be a 32-byte checkpoint id")
        held = self.ledger.store.served_checkpoint()
        if held is None or (wanted is not None and held[0].id != wanted):
            raise InvalidParams("no such checkpoint here (it may have been replaced)",
                                data={"reason": "no_checkpoint"})
        header, body = held
        yield header.to_wire()
        for i in range(0, len(body), CHUNK_BYTES):
            yield body[i:i + CHUNK_BYTES]
            await trio.lowlevel.checkpoint()


class Checkpoints:
    """Makes, fetches and prunes to checkpoints for one ledger."""

    def __init__(self, ledger: Ledger, rpc: Any) -> None:
        self.ledger = ledger
        self.rpc = rpc
        self.made = 0
        self.loaded = 0
        self._fetching = False

    # -- making ----------------------------------------------------------------------
    def may_make(self) -> bool:
        ledger = self.ledger
        return "auth" in ledger.grants_of(ledger.peer_id) and not ledger.fenced

    def due(self) -> bool:
        """Enough events since the newest checkpoint this node holds, and
        none waiting for earlier ones (an erasure takes effect while it
        waits: the state would then hold more than its version vector)."""
        every = self.ledger.settings.checkpoint_events
        if every <= 0 or not self.may_make() or self.ledger.store.held_count:
            return False
        newest = self.ledger.store.newest_checkpoint()
        covered = newest.events if newest is not None else 0
        return sum(self.ledger.store.heads.values()) - covered >= every

    async def make(self) -> CheckpointHeader:
        """Make, sign and store a checkpoint of this node's state now. The
        rows are read in one read transaction of a second connection (a
        consistent snapshot with its version vector) in a worker thread."""
        ledger = self.ledger
        store = ledger.store
        vv, columns, tables = await trio.to_thread.run_sync(store.read_state)
        docs = [d.to_wire() for d in store.membership.docs()]
        ckpt = await trio.to_thread.run_sync(
            lambda: make_checkpoint(ledger.identity, ledger.network_id, vv, columns, tables,
                                    docs))
        body = await trio.to_thread.run_sync(ckpt.body)
        store.save_checkpoint(ckpt, body)
        self.made += 1
        log.info("made checkpoint %s: %d events, %d rows, %d bytes",
                 ckpt.header.id.hex()[:12], ckpt.header.events, ckpt.header.rows, len(body))
        return ckpt.header

    # -- fetching --------------------------------------------------------------------
    def wants(self, header: CheckpointHeader, floor: Mapping[str, int]) -> bool:
        """Whether to fetch ``header`` from a peer that pruned up to
        ``floor``: we lack events it no longer serves, or we lack at least
        ``checkpoint_catchup`` of the events it covers, or we hold them all
        and it lets us prune."""
        store = self.ledger.store
        heads = store.heads
        held = store.newest_checkpoint()
        if held is not None and held.events >= header.events:
            return False
        if any(heads.get(a, 0) < s for a, s in floor.items()):
            return True
        missing = sum(max(0, s - heads.get(a, 0)) for a, s in header.vv.items())
        catchup = self.ledger.settings.checkpoint_catchup
        if missing:
            return catchup > 0 and missing >= catchup
        return self._may_prune_with(header)

    def _may_prune_with(self, header: CheckpointHeader) -> bool:
        settings = self.ledger.settings
        return settings.prune_after_days >= 0 and (
            header.made_at <= time.time() - settings.prune_after_days * 86400)

    async def fetch(self, peer: str, header: CheckpointHeader) -> bool:
        """Fetch, check and take ``header`` from ``peer``; False if one is
        being fetched already."""
        if self._fetching:
            return False
        self._fetching = True
        try:
            parts: list[bytes] = []
            size = 0
            got: CheckpointHeader | None = None
            async with self.rpc.stream(peer, "ledgerCheckpoint", {"id": header.id}) as items:
                while True:
                    with trio.fail_after(FETCH_TIMEOUT):
                        try:
                            item = await items.__anext__()
                        except StopAsyncIteration:
                            break
                    if got is None:
                        got = CheckpointHeader.from_wire(item)
                        continue
                    if not isinstance(item, bytes):
                        raise InvalidParams("malformed ledgerCheckpoint chunk")
                    size += len(item)
                    if size > MAX_WIRE_BYTES:
                        raise InvalidEvent(f"checkpoint over {MAX_WIRE_BYTES} bytes")
                    parts.append(item)
            if got is None or got.id != header.id:
                raise InvalidParams("the peer sent another checkpoint than it announced")
            body = b"".join(parts)
            ckpt = await trio.to_thread.run_sync(
                open_checkpoint, got, body, self.ledger.network_id)
            self.take(ckpt, body)
            return True
        finally:
            self._fetching = False

    def take(self, ckpt: Checkpoint, body: bytes) -> None:
        """Use a checked checkpoint: load it if it covers events we lack,
        else keep it to prune with and serve.

        Raises:
            UnauthorizedAuthor: its maker is not granted ``auth``.
        """
        store = self.ledger.store
        header = ckpt.header
        store.absorb_docs(ckpt.docs, source=f"checkpoint of {short(header.maker)}")
        if "auth" not in store.membership.grants(header.maker, header.made_at):
            raise UnauthorizedAuthor(
                f"{short(header.maker)} is not granted auth: it may not make checkpoints")
        heads = store.heads
        if any(heads.get(a, 0) < s for a, s in header.vv.items()):
            store.load_checkpoint(ckpt, body)
            self.loaded += 1
            log.info("loaded checkpoint %s of %s: %d events, %d rows",
                     header.id.hex()[:12], short(header.maker), header.events, header.rows)
        else:
            store.save_checkpoint(ckpt, body)

    # -- pruning ---------------------------------------------------------------------
    def prune(self) -> int:
        """Delete the events within the newest checkpoint kept for
        ``prune_after_days``; returns how many went."""
        store = self.ledger.store
        if self.ledger.settings.prune_after_days < 0:
            return 0
        for header in store.checkpoints():
            if self._may_prune_with(header) and self.ledger.covers(header.vv):
                return store.prune(header)
        return 0

    async def run(self) -> None:
        """Make checkpoints when due and prune, every ``sync_interval``."""
        while True:
            await trio.sleep(self.ledger.settings.sync_interval)
            try:
                if self.due():
                    await self.make()
                gone = self.prune()
                if gone:
                    log.info("pruned %d events within a checkpoint", gone)
            except (StorageError, P2PInferError) as exc:
                log.warning("checkpoints: %s", exc)
