"""The ledger store: one SQLite file per node, the only place that writes SQL.

:class:`Store` holds the events table, the version vector (``heads``), the
membership documents and the materialised tables (:mod:`.views`). It checks
and applies events; it knows nothing about the network.

Accepting an event (:meth:`Store.ingest`) goes through, in order:

1. decode, network id, signature and body shape (:func:`.events.decode`);
2. for membership events, absorb the owner-signed document they carry;
3. the author must be a member whose certificate allows the kind at the
   event's time, and not removed before its seq;
4. the same ``(author, seq)`` with other content is a replay;
5. if ``seq`` is the author's next, apply it (and any held successors);
   if it is further ahead, keep it *held* until the gap is filled.

A refused event raises nothing: it is counted, logged with its reason and
listed in the :class:`IngestReport`, and nothing else changes. A batch is one
transaction; SQLite errors become :class:`~p2pinfer.errors.StorageError` and
leave the store as it was before the batch.

SQLite runs in WAL mode with ``synchronous=NORMAL`` by default: a committed
transaction survives the process being killed (SIGKILL); ``synchronous =
"full"`` also survives power loss, at the price of an fsync per commit.
Calls are synchronous and short (one transaction per batch of at most a few
hundred events), so they run on the trio thread.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from ..errors import InvalidEvent, LedgerError, ReplayedEvent, StorageError, UnauthorizedAuthor
from ..identity import Identity
from ..wire import canonical_pack, pack, unpack
from . import views
from .checkpoints import STATE_TABLES, Checkpoint, CheckpointHeader, decode_body, redact_body
from .clock import HybridClock, hlc_from_wall, wall_of
from .events import (
    LOG_KINDS,
    MEMBER_KINDS,
    REDACTABLE_KINDS,
    Event,
    Stub,
    decode_any,
    decode_stub,
    decode_trusted,
    make_stub,
    sign_event,
)
from .membership import Membership, NetworkInfo, SignedDoc, short
from .metrics import LedgerMetrics
from .migrations import migrate

__all__ = ["Store", "IngestReport"]

log = logging.getLogger(__name__)

Listener = Callable[[list[Event], str], None]
# Kinds whose events never change a user, key, session or member.
USAGE_KINDS = frozenset({"usage", "request.logged", "apikey.used", "audit"}) | LOG_KINDS


def _private_files(path: Path) -> None:
    """Make the database, and its WAL and shared-memory files, readable by
    this user only (0600): they hold personal data (emails, password and key
    hashes, audit rows with client addresses). A new file is created so;
    SQLite gives the files it creates beside it the database's own mode."""
    if str(path) == ":memory:":
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            if name.stat().st_mode & 0o077:
                os.chmod(name, 0o600)
        except FileNotFoundError:
            continue


@dataclass
class IngestReport:
    """What became of a batch of events."""

    applied: list[Event] = field(default_factory=list)
    held: int = 0
    duplicates: int = 0
    rejected: list[LedgerError] = field(default_factory=list)
    gaps: dict[str, int] = field(default_factory=dict)  # author -> seq we now wait for
    stubs: int = 0  # redacted registrations accepted in place of events
    deferred: int = 0  # stubs not yet vouched for by an erasure we hold


class Store:
    """The SQLite ledger store of one node.

    Args:
        path: the database file (created with its directory if missing).
        network: the network whose events this store accepts.
        metrics: where counters go (default: a private registry).
        synchronous: ``"normal"`` or ``"full"`` (see the module docstring).
        wall: the wall clock (seconds), for HLC timestamps and expiry checks.
    """

    def __init__(
        self,
        path: Path | str,
        network: NetworkInfo,
        *,
        metrics: LedgerMetrics | None = None,
        synchronous: str = "normal",
        wall: Callable[[], float] = time.time,
    ) -> None:
        if synchronous not in ("normal", "full"):
            raise ValueError("synchronous must be 'normal' or 'full'")
        self.path = Path(path)
        self.network = network
        self.metrics = metrics or LedgerMetrics()
        self.wall = wall
        self.clock = HybridClock(wall)
        self.heads: dict[str, int] = {}
        self.log_heads: dict[str, int] = {}  # the log lane: highest seq held per author
        self.held_count = 0
        self.membership = Membership(network)
        self.listeners: list[Listener] = []
        # Called with (peer id, removed) when a document changes a peer's
        # standing: a new certificate, or a removal. Listeners only schedule
        # work (the store is mid-transaction).
        self.membership_listeners: list[Callable[[str, bool], None]] = []
        # Bumped whenever applied events may change who holds which key, role
        # or account (anything but usage, request logs, key use and audit):
        # a cache of credentials is valid while this stays the same.
        self.credentials_version = 0
        self._rebuild_needed = False
        self.compact_due = False  # an erasure redacted something: compact the WAL
        self.commits = 0  # transactions committed since opening
        self._checkpoint_conn: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _private_files(self.path)
            conn = sqlite3.connect(str(self.path), isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
            conn.execute("PRAGMA busy_timeout=5000")
            # Deleted and overwritten content is zeroed, not left in free pages:
            # an erased user's data must not survive in the file (see .privacy).
            conn.execute("PRAGMA secure_delete=ON")
            self.conn = conn
            self.db = Database(conn)
            migrate(self.db)
            self._reload()
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open the ledger store {self.path}: {exc}") from exc

    def close(self) -> None:
        if self._checkpoint_conn is not None:
            self._checkpoint_conn.close()
            self._checkpoint_conn = None
        self.conn.close()

    # -- WAL checkpoints ---------------------------------------------------------------
    def set_autocheckpoint(self, pages: int) -> None:
        """SQLite's automatic checkpoint runs inside the commit that crosses
        ``pages`` of write-ahead log, on the committing connection: on the
        event loop, 10-15 ms for a busy node's log. :meth:`checkpoint` from a
        thread does it instead (see ``Ledger.run``); this raises the automatic
        one to a backstop meanwhile (``1000``, SQLite's default, restores it)."""
        self.conn.execute(f"PRAGMA wal_autocheckpoint={int(pages)}")

    def wal_checkpoint(self) -> tuple[int, int]:
        """Copy the write-ahead log into the database file without waiting
        for readers or writers (a PASSIVE checkpoint), on a connection of its
        own: safe to call from one worker thread while the main connection
        keeps working. Returns (log frames, frames checkpointed)."""
        try:
            if self._checkpoint_conn is None:
                self._checkpoint_conn = sqlite3.connect(
                    str(self.path), isolation_level=None, check_same_thread=False)
                self._checkpoint_conn.execute("PRAGMA busy_timeout=5000")
            row = self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"checkpoint of {self.path}: {exc}") from exc
        return int(row[1]), int(row[2])

    # -- state kept in memory -------------------------------------------------------
    def _reload(self) -> None:
        """Rebuild the in-memory state from the database (at open, and after a
        failed transaction so memory never runs ahead of disk)."""
        membership = Membership(self.network)
        for (doc,) in self.conn.execute("SELECT doc FROM membership_docs"):
            try:
                membership.add(unpack(doc))
            except LedgerError:
                log.exception("stored membership document no longer verifies")
        self.membership = membership
        self.heads = {a: s for a, s in self.conn.execute("SELECT author, seq FROM heads")}
        self.log_heads = {a: s for a, s in
                          self.conn.execute("SELECT author, seq FROM log_heads")}
        row = self.conn.execute("SELECT value FROM local_state WHERE key='fence'").fetchone()
        self.fence: dict[str, Any] | None = json.loads(row[0]) if row else None
        row = self.conn.execute("SELECT value FROM local_state WHERE key='floor'").fetchone()
        # Events up to floor[author] were pruned (covered by a checkpoint).
        self.floor: dict[str, int] = json.loads(row[0]) if row else {}
        self.held_count = self.conn.execute(
            "SELECT count(*) FROM events WHERE applied=0").fetchone()[0]
        top = self.conn.execute("SELECT max(hlc) FROM events").fetchone()[0]
        log_top = self.conn.execute("SELECT max(hlc) FROM log_events").fetchone()[0]
        self.clock.last = max(self.clock.last, top or 0, log_top or 0)
        self.metrics.held.set(self.held_count)
        self._rebuild_needed = False

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        try:
            with self.db.atomic():
                yield
                if self._rebuild_needed:
                    self._rebuild_views()
            self.commits += 1
        except sqlite3.Error as exc:
            self._reload()
            raise StorageError(f"ledger store {self.path}: {exc}") from exc
        except BaseException:
            self._reload()
            raise

    def version_vector(self) -> dict[str, int]:
        """The highest contiguous seq applied, per author."""
        return dict(self.heads)

    # -- membership documents ------------------------------------------------------
    def absorb_docs(self, wires: Iterable[Any], *, source: str = "local") -> int:
        """Add owner-signed documents (certificates, removals); returns how
        many were new. Invalid documents are counted as rejections and skipped."""
        added = 0
        with self._transaction():
            for wire in wires:
                if self.membership.knows(wire):
                    continue
                try:
                    added += self._absorb(wire)
                except LedgerError as exc:
                    reason = self.metrics.reject(exc)
                    log.warning("refused a membership document from %s (%s): %s",
                                source, reason, exc.message)
        return added

    def _absorb(self, wire: Any) -> int:
        change = self.membership.add(wire)
        if change is None:
            return 0
        doc = SignedDoc(wire["doc"], wire["sig"]) if isinstance(wire, dict) else wire
        peer, cutoff = change
        self.conn.execute(
            "INSERT OR IGNORE INTO membership_docs (hash, peer_id, type, doc, added_at) "
            "VALUES (?,?,?,?,?)",
            (doc.hash, peer, doc.doc["t"], canonical_pack(doc.to_wire()), self.wall()))
        info = self.membership.info(peer)
        if info is not None:
            self.conn.execute(
                "INSERT OR REPLACE INTO members (peer_id, roles, admitted_at, expires_at, "
                "removed_after) VALUES (?,?,?,?,?)",
                (peer, ",".join(sorted(info.roles)), info.admitted_at, info.expires_at,
                 info.removed_after))
        if cutoff is not None:
            self._cut(peer, cutoff)
        for listener in list(self.membership_listeners):
            try:
                listener(peer, cutoff is not None)
            except Exception:
                log.exception("membership listener failed")
        return 1

    def _cut(self, peer: str, cutoff: int) -> None:
        """Void a removed peer's events after ``cutoff``."""
        held = self.conn.execute("DELETE FROM events WHERE author=? AND seq>? AND applied=0",
                                 (peer, cutoff)).rowcount
        self.held_count -= held
        voided = self.conn.execute("DELETE FROM events WHERE author=? AND seq>? AND applied=1",
                                   (peer, cutoff)).rowcount
        if voided:
            log.warning("removal of %s voids %d applied events; rebuilding views", short(peer),
                        voided)
            self.heads[peer] = cutoff
            self.conn.execute("UPDATE heads SET seq=? WHERE author=?", (cutoff, peer))
            self._rebuild_needed = True

    # -- events ------------------------------------------------------------------
    def ingest(self, raws: Sequence[bytes], *, source: str = "sync") -> IngestReport:
        """Check and apply events from elsewhere (any order, duplicates fine).

        Raises:
            StorageError: the database failed; the batch left no trace.
        """
        report = IngestReport()
        decoded: list[Event | Stub] = []
        for raw in raws:
            try:
                decoded.append(decode_any(raw, self.network.network_id))
            except LedgerError as exc:
                self._refuse(exc, None, source, report)
        if decoded:
            touched: set[str] = set()
            with self._transaction():
                # Membership documents first: an author's admission may come
                # later in the batch than its first events.
                bad_docs: dict[tuple[str, int], LedgerError] = {}
                for ev in decoded:
                    if isinstance(ev, Event) and ev.kind in MEMBER_KINDS:
                        try:
                            self._absorb(ev.body["cert" if ev.kind == "member.admitted"
                                                 else "removal"])
                        except LedgerError as exc:
                            bad_docs[ev.id] = exc
                # Stubs last: the erasure that vouches for them may be in the batch.
                decoded.sort(key=lambda item: isinstance(item, Stub))
                for ev in decoded:
                    try:
                        if ev.id in bad_docs:
                            raise bad_docs[ev.id]
                        self._accept(ev, report, touched)
                    except LedgerError as exc:
                        self._refuse(exc, ev, source, report)
                self._save_heads(touched)
            self.metrics.held.set(self.held_count)
        self._notify(report.applied, source, changed=bool(report.stubs))
        return report

    def _refuse(self, exc: LedgerError, ev: Event | Stub | None, source: str,
                report: IngestReport) -> None:
        reason = self.metrics.reject(exc)
        what = f"{short(ev.author)}#{ev.seq} ({ev.kind})" if ev else "an event"
        log.warning("refused %s from %s: %s: %s", what, source, reason, exc.message)
        report.rejected.append(exc)

    def _accept(self, ev: Event | Stub, report: IngestReport, touched: set[str]) -> None:
        if ev.kind in LOG_KINDS:
            raise InvalidEvent(f"{ev.kind} belongs to the log lane, not an author's sequence")
        self.membership.check_author(ev.author, ev.kind, ev.seq, wall_of(ev.hlc))
        row = self.conn.execute("SELECT hash FROM events WHERE author=? AND seq=?",
                                (ev.author, ev.seq)).fetchone()
        if row is not None and row[0] != ev.hash:
            raise ReplayedEvent(
                f"{short(ev.author)}#{ev.seq} was already received with other content")
        if row is not None or ev.seq <= self.floor.get(ev.author, 0):
            # (an event within a checkpoint was pruned or never held: it is
            # in the state already)
            report.duplicates += 1
            self.metrics.duplicates.inc()
            return
        if isinstance(ev, Stub) and not self._redaction_of(ev.author, ev.seq, ev.hash):
            # Not (yet) vouched for by an erasure we hold: ask again later.
            report.deferred += 1
            report.gaps[ev.author] = max(report.gaps.get(ev.author, 0), ev.seq)
            return
        if isinstance(ev, Event) and ev.kind == "user.erased":
            # An erasure takes effect as soon as it is accepted, even if it
            # must wait for earlier events of its author: the registration it
            # redacts usually comes earlier in the same sequence, as a stub
            # without content, so the erasure's effect cannot wait for it.
            # (Applying it again on release is a no-op.)
            self._redact(ev)
            views.apply(self.conn, ev)
        head = self.heads.get(ev.author, 0)
        if ev.seq > head + 1:
            self._insert(ev, applied=False)
            self.held_count += 1
            report.held += 1
            report.gaps[ev.author] = max(report.gaps.get(ev.author, 0), ev.seq - 1)
            return
        self._apply(self._insert(ev, applied=True), report)
        self.heads[ev.author] = ev.seq
        self._release(ev.author, report)  # held successors
        touched.add(ev.author)

    def _apply(self, ev: Event | Stub, report: IngestReport) -> None:
        self.clock.observe(ev.hlc)
        if isinstance(ev, Stub):  # a redacted registration of an erased user: no effect
            report.stubs += 1
            return
        views.apply(self.conn, ev)
        report.applied.append(ev)

    def _insert(self, ev: Event | Stub, *, applied: bool) -> Event | Stub:
        """Store ``ev``; returns what was stored: a stub in its place if an
        erasure already applied lists it (it then has no effect either)."""
        stored = ev
        if isinstance(ev, Event) and ev.kind in REDACTABLE_KINDS:
            user_id = self._redaction_of(ev.author, ev.seq, ev.hash)
            if user_id is not None and user_id == ev.body.get("user_id"):
                stored = make_stub(self.network.network_id, ev.author, ev.seq, ev.hlc, ev.kind,
                                   ev.hash)
        self.conn.execute(
            "INSERT INTO events (author, seq, hlc, kind, hash, raw, applied, received_at, "
            "redacted) VALUES (?,?,?,?,?,?,?,?,?)",
            (ev.author, ev.seq, ev.hlc, ev.kind, ev.hash, stored.raw, int(applied), self.wall(),
             int(isinstance(stored, Stub))))
        return stored

    # -- erasure ---------------------------------------------------------------------
    def _redaction_of(self, author: str, seq: int, digest: bytes) -> str | None:
        """The erased user id an applied erasure names for this event, if any."""
        row = self.conn.execute(
            "SELECT user_id FROM redactions WHERE author=? AND seq=? AND hash=?",
            (author, seq, digest)).fetchone()
        return None if row is None else str(row[0])

    def _stub_of(self, author: str, seq: int, hlc: int, kind: str, digest: bytes) -> bytes:
        return make_stub(self.network.network_id, author, seq, hlc, kind, digest).raw

    def _redact(self, erasure: Event) -> None:
        """Record what an accepted erasure redacts, and redact what we hold."""
        user_id = erasure.body["user_id"]
        for item in erasure.body.get("redacts", []):
            author, seq, digest = item["author"], item["seq"], item["hash"]
            self.conn.execute(
                "INSERT OR IGNORE INTO redactions (author, seq, hash, user_id, erasure_author, "
                "erasure_seq) VALUES (?,?,?,?,?,?)",
                (author, seq, digest, user_id, erasure.author, erasure.seq))
            row = self.conn.execute(
                "SELECT raw FROM events WHERE author=? AND seq=? AND hash=? AND redacted=0",
                (author, seq, digest)).fetchone()
            if row is None:
                continue
            held = decode_trusted(row[0])
            if held.kind not in REDACTABLE_KINDS or held.body.get("user_id") != user_id:
                log.warning("erasure %s#%d lists %s#%d, which is no registration of %s; kept",
                            short(erasure.author), erasure.seq, short(author), seq, user_id)
                continue
            self.conn.execute(
                "UPDATE events SET raw=?, redacted=1 WHERE author=? AND seq=?",
                (self._stub_of(author, seq, held.hlc, held.kind, digest), author, seq))
        self._redact_checkpoints({user_id})
        self.compact_due = True

    def _save_heads(self, touched: Iterable[str]) -> None:
        for author in touched:
            self.conn.execute(
                "INSERT INTO heads (author, seq) VALUES (?,?) ON CONFLICT(author) DO UPDATE "
                "SET seq=excluded.seq", (author, self.heads[author]))

    def append(self, identity: Identity, items: Sequence[tuple[str, dict[str, Any]]],
               ) -> list[Event]:
        """Sign and apply new events authored by this node, in one transaction.

        Raises:
            InvalidEvent: a malformed body; UnauthorizedAuthor, KindNotAllowed:
            this node may not write that kind; StorageError: nothing was written
            (also while the restore fence holds: ``data.reason = "restored"``).
        """
        me = identity.peer_id
        if self.fence is not None:
            raise StorageError(
                "this node was restored from a backup and has not yet learnt its own latest "
                "events from its peers; it writes again once it has (see p2pinfer.ledger.backup)",
                data={"reason": "restored", "retry_after": 1.0})
        out: list[Event] = []
        touched: set[str] = set()
        logged: set[str] = set()
        with self._transaction():
            for kind, body in items:
                if kind in LOG_KINDS:
                    out.append(self._append_log(identity, kind, body))
                    logged.add(me)
                    continue
                seq = self.heads.get(me, 0) + 1
                hlc = self.clock.now()
                ev = sign_event(identity, self.network.network_id, seq, hlc, kind, body)
                if kind in MEMBER_KINDS:
                    self._absorb(body["cert" if kind == "member.admitted" else "removal"])
                self.membership.check_author(me, kind, seq, ev.wall)
                if kind == "user.erased":
                    self._redact(ev)  # views: applied just below
                self._insert(ev, applied=True)
                report = IngestReport()
                self._apply(ev, report)
                self.heads[me] = seq
                touched.add(me)
                out.append(ev)
            self._save_heads(touched)
            self._save_log_heads(logged)
        self._notify(out, "local")
        return out

    # -- the log lane (see .logs) ------------------------------------------------------
    def _append_log(self, identity: Identity, kind: str, body: dict[str, Any]) -> Event:
        me = identity.peer_id
        seq = self.log_heads.get(me, 0) + 1
        ev = sign_event(identity, self.network.network_id, seq, self.clock.now(), kind, body)
        self._check_log_author(ev)
        self._insert_log(ev)
        return ev

    def _check_log_author(self, ev: Event) -> None:
        # A removal's cutoff counts in the main lane: a removed member's log
        # events are refused whatever their number.
        if self.membership.cutoff(ev.author) is not None:
            raise UnauthorizedAuthor(f"{ev.author} was removed; it may log nothing more")
        self.membership.check_author(ev.author, ev.kind, 0, ev.wall)

    def _insert_log(self, ev: Event) -> None:
        self.conn.execute(
            "INSERT INTO log_events (author, seq, hlc, hash, raw) VALUES (?,?,?,?,?)",
            (ev.author, ev.seq, ev.hlc, ev.hash, ev.raw))
        views.apply(self.conn, ev)
        self.log_heads[ev.author] = max(self.log_heads.get(ev.author, 0), ev.seq)

    def raise_log_head(self, author: str, seq: int) -> None:
        """Number ``author``'s next log-lane event after ``seq`` (events a
        peer holds that this store lost: it was restored from a backup)."""
        with self._transaction():
            self.log_heads[author] = max(self.log_heads.get(author, 0), seq)
            self._save_log_heads([author])

    def _save_log_heads(self, touched: Iterable[str]) -> None:
        for author in touched:
            self.conn.execute(
                "INSERT INTO log_heads (author, seq) VALUES (?,?) ON CONFLICT(author) DO UPDATE "
                "SET seq=excluded.seq", (author, self.log_heads[author]))

    def ingest_logs(self, raws: Sequence[bytes], *, source: str = "sync") -> IngestReport:
        """Check and keep log-lane events pulled from a peer.

        Holders serve each author's events in ascending order from the
        oldest they still keep, so an event is taken if it is past what is
        held of its author (older ones expired where they came from);
        the same ``(author, seq)`` with other content is a replay.

        Raises:
            StorageError: the database failed; the batch left no trace.
        """
        report = IngestReport()
        decoded: list[Event] = []
        for raw in raws:
            try:
                ev = decode_any(raw, self.network.network_id)
                if not isinstance(ev, Event) or ev.kind not in LOG_KINDS:
                    raise InvalidEvent("only log-lane events may be pulled as logs")
                decoded.append(ev)
            except LedgerError as exc:
                self._refuse(exc, None, source, report)
        if not decoded:
            return report
        touched: set[str] = set()
        with self._transaction():
            for ev in sorted(decoded, key=lambda e: (e.author, e.seq)):
                try:
                    self._check_log_author(ev)
                    if ev.seq <= self.log_heads.get(ev.author, 0):
                        row = self.conn.execute(
                            "SELECT hash FROM log_events WHERE author=? AND seq=?",
                            (ev.author, ev.seq)).fetchone()
                        if row is not None and row[0] != ev.hash:
                            raise ReplayedEvent(f"{short(ev.author)}#{ev.seq} (log lane) was "
                                                "already received with other content")
                        report.duplicates += 1
                        continue
                    self._insert_log(ev)
                    self.clock.observe(ev.hlc)
                    touched.add(ev.author)
                    report.applied.append(ev)
                except LedgerError as exc:
                    self._refuse(exc, ev, source, report)
            self._save_log_heads(touched)
        self._notify(report.applied, source)
        return report

    def read_log_range(self, author: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        """(seq, raw) of the log-lane events of ``author`` held here with
        ``seq > after``, ascending (expired ones leave holes)."""
        return [(int(seq), raw) for seq, raw in self.conn.execute(
            "SELECT seq, raw FROM log_events WHERE author=? AND seq>? ORDER BY seq LIMIT ?",
            (author, after, limit)).fetchall()]

    def expire(self, *, logs_before: float | None, audit_before: float | None) -> dict[str, int]:
        """Delete request logs (log-lane events and rows, legacy rows too)
        created before ``logs_before`` and audit rows before
        ``audit_before`` (seconds since the epoch; None keeps them).
        Returns how many of each went. ``log_heads`` stay, so expired
        events are not pulled again."""
        out = {"log_events": 0, "request_logs": 0, "audit": 0}
        with self._transaction():
            if logs_before is not None:
                out["log_events"] = self.conn.execute(
                    "DELETE FROM log_events WHERE hlc < ?", (hlc_from_wall(logs_before),)).rowcount
                out["request_logs"] = self.conn.execute(
                    "DELETE FROM request_logs WHERE created_at < ?", (logs_before,)).rowcount
            if audit_before is not None:
                out["audit"] = self.conn.execute(
                    "DELETE FROM audit WHERE time < ?", (audit_before,)).rowcount
        return out

    # -- checkpoints of the main lane (see .checkpoints) -------------------------------
    def read_state(self) -> tuple[dict[str, int], dict[str, list[str]],
                                  dict[str, list[list[Any] | bytes]]]:
        """The version vector and the rows of every state table, read in one
        transaction on a connection of its own (a consistent snapshot:
        safe to call from a worker thread while the main one writes)."""
        try:
            conn = sqlite3.connect(str(self.path), isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the state of {self.path}: {exc}") from exc
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("BEGIN")
            vv = {a: int(seq) for a, seq in conn.execute("SELECT author, seq FROM heads")}
            columns: dict[str, list[str]] = {}
            tables: dict[str, list[list[Any] | bytes]] = {}
            for table in STATE_TABLES:
                columns[table] = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
                tables[table] = [list(r) for r in conn.execute(f"SELECT * FROM {table}")]
            conn.execute("COMMIT")
            return vv, columns, tables
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the state of {self.path}: {exc}") from exc
        finally:
            conn.close()

    def checkpoints(self) -> list[CheckpointHeader]:
        """The checkpoints kept here, newest (most events) first."""
        return [CheckpointHeader.from_wire(unpack(h)) for (h,) in self.conn.execute(
            "SELECT header FROM checkpoints ORDER BY events DESC, made_at DESC").fetchall()]

    def newest_checkpoint(self) -> CheckpointHeader | None:
        held = self.checkpoints()
        return held[0] if held else None

    def served_checkpoint(self) -> tuple[CheckpointHeader, bytes] | None:
        """The newest checkpoint and its compressed body."""
        row = self.conn.execute("SELECT header, body FROM checkpoints ORDER BY events DESC, "
                                "made_at DESC LIMIT 1").fetchone()
        return None if row is None else (CheckpointHeader.from_wire(unpack(row[0])), row[1])

    def _erased_ids(self) -> set[str]:
        return {u for (u,) in self.conn.execute("SELECT user_id FROM erased_users")}

    def _dominates_floor(self, vv: Mapping[str, int]) -> bool:
        return all(vv.get(a, 0) >= s for a, s in self.floor.items())

    def save_checkpoint(self, ckpt: Checkpoint, body: bytes | None = None) -> None:
        """Keep a checked checkpoint (rows of users erased here meanwhile
        are redacted first). Besides it, only the base (the one events were
        pruned to) and the newest are kept."""
        with self._transaction():
            self._save_checkpoint(ckpt, body)

    def _save_checkpoint(self, ckpt: Checkpoint, body: bytes | None) -> None:
        if redact_body(ckpt, self._erased_ids()) or body is None:
            body = ckpt.body()
        header = ckpt.header
        self.conn.execute(
            "INSERT OR REPLACE INTO checkpoints (id, made_at, events, header, body) "
            "VALUES (?,?,?,?,?)", (header.id, header.made_at, header.events,
                                   pack(header.to_wire()), body))
        self._drop_old_checkpoints()

    def _drop_old_checkpoints(self) -> None:
        """Keep the newest checkpoint and the newest one a rebuild can start
        from (covering every pruned event); drop the others."""
        rows = self.conn.execute(
            "SELECT id, header FROM checkpoints ORDER BY events DESC, made_at DESC").fetchall()
        base_kept = not self.floor
        for i, (cid, raw) in enumerate(rows):
            is_base = not base_kept and self._dominates_floor(
                CheckpointHeader.from_wire(unpack(raw)).vv)
            base_kept = base_kept or is_base
            if i > 0 and not is_base:
                self.conn.execute("DELETE FROM checkpoints WHERE id=?", (cid,))

    def _base(self) -> Checkpoint | None:
        """The newest checkpoint covering every pruned event (None if none
        were pruned): a rebuild loads it and applies the events above it."""
        if not self.floor:
            return None
        for (raw, body) in self.conn.execute(
                "SELECT header, body FROM checkpoints ORDER BY events DESC").fetchall():
            header = CheckpointHeader.from_wire(unpack(raw))
            if self._dominates_floor(header.vv):
                return decode_body(header, body)
        raise StorageError(f"{self.path}: events were pruned to a checkpoint no longer held")

    def _redact_checkpoints(self, user_ids: set[str]) -> None:
        for (cid, raw, body) in self.conn.execute(
                "SELECT id, header, body FROM checkpoints").fetchall():
            ckpt = decode_body(CheckpointHeader.from_wire(unpack(raw)), body)
            if redact_body(ckpt, user_ids):
                self.conn.execute("UPDATE checkpoints SET body=? WHERE id=?",
                                  (ckpt.body(), cid))

    def _load_rows(self, ckpt: Checkpoint) -> None:
        """Replace the state tables by a checkpoint's rows (redacted rows
        are skipped; the redactions it lists are added to ours)."""
        for table in STATE_TABLES:
            if table != "redactions":
                self.conn.execute(f"DELETE FROM {table}")
            cols = ckpt.columns.get(table)
            rows = ckpt.tables.get(table)
            if not cols or not rows:
                continue
            mine = {r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")}
            keep = [i for i, c in enumerate(cols) if c in mine]
            names = ", ".join(cols[i] for i in keep)
            marks = ", ".join("?" for _ in keep)
            verb = "INSERT OR IGNORE" if table == "redactions" else "INSERT OR REPLACE"
            self.conn.executemany(
                f"{verb} INTO {table} ({names}) VALUES ({marks})",
                ([row[i] for i in keep] for row in rows if not isinstance(row, bytes)))

    def _replay_above(self, vv: dict[str, int]) -> None:
        """Apply again the events held above ``vv`` (after loading rows)."""
        for (author, seq, raw, kind) in self.conn.execute(
                "SELECT author, seq, raw, kind FROM events WHERE redacted=0 "
                "AND (applied=1 OR kind='user.erased') ORDER BY author, seq").fetchall():
            if seq > vv.get(author, 0) or kind == "request.logged":
                views.apply(self.conn, decode_trusted(raw))
        for (raw,) in self.conn.execute(
                "SELECT raw FROM log_events ORDER BY author, seq").fetchall():
            views.apply(self.conn, decode_trusted(raw))

    def load_checkpoint(self, ckpt: Checkpoint, body: bytes | None = None) -> None:
        """Take a checked checkpoint's state as ours (one transaction): its
        rows replace the state tables, the events it covers are dropped,
        the events held above it are applied again, and events waiting for
        earlier ones it covers are released. The caller checked the
        signature, the rows and the maker's grant."""
        vv = ckpt.header.vv
        if not self._dominates_floor(vv):
            raise InvalidEvent("the checkpoint is older than the one this node pruned to")
        report = IngestReport()
        with self._transaction():
            for wire in ckpt.docs:  # owner-signed: checked as any document
                if not self.membership.knows(wire):
                    try:
                        self._absorb(wire)
                    except LedgerError as exc:
                        log.warning("refused a membership document in a checkpoint (%s): %s",
                                    self.metrics.reject(exc), exc.message)
            if redact_body(ckpt, self._erased_ids()):
                body = None  # the bytes received still hold what was erased here
            views.clear(self.conn)
            self._load_rows(ckpt)
            touched: set[str] = set()
            for author, seq in vv.items():
                self.held_count -= self.conn.execute(
                    "SELECT count(*) FROM events WHERE author=? AND seq<=? AND applied=0",
                    (author, seq)).fetchone()[0]
                self.conn.execute(
                    "DELETE FROM events WHERE author=? AND seq<=? AND kind NOT IN "
                    "('member.admitted', 'member.removed', 'request.logged')", (author, seq))
                self.conn.execute("UPDATE events SET applied=1 WHERE author=? AND seq<=?",
                                  (author, seq))
                if seq > self.heads.get(author, 0):
                    self.heads[author] = seq
                    touched.add(author)
                self.floor[author] = max(self.floor.get(author, 0), seq)
            self._replay_above(vv)
            for author in touched:
                self._release(author, report)
            self._save_heads(touched)
            self._save_floor()
            self._save_checkpoint(ckpt, body)
            self._rebuild_needed = False
            self.metrics.held.set(self.held_count)
        self._notify(report.applied, "checkpoint", changed=True)

    def _release(self, author: str, report: IngestReport) -> None:
        """Apply the held events of ``author`` that now follow its head."""
        head = self.heads.get(author, 0)
        while True:
            nxt = self.conn.execute(
                "SELECT raw, redacted FROM events WHERE author=? AND seq=? AND applied=0",
                (author, head + 1)).fetchone()
            if nxt is None:
                break
            self.conn.execute("UPDATE events SET applied=1 WHERE author=? AND seq=?",
                              (author, head + 1))
            held: Event | Stub = (decode_stub(nxt[0]) if nxt[1] else decode_trusted(nxt[0]))
            self._apply(held, report)
            self.held_count -= 1
            head += 1
        self.heads[author] = head

    def _save_floor(self) -> None:
        self.conn.execute(
            "INSERT INTO local_state (key, value) VALUES ('floor', ?) ON CONFLICT(key) "
            "DO UPDATE SET value=excluded.value", (json.dumps(self.floor, sort_keys=True),))

    def prune(self, header: CheckpointHeader) -> int:
        """Delete the events within ``header`` (a checkpoint kept here,
        covered by our heads) except membership events (this node finds its
        own admission among them) and legacy request logs; returns how many
        went. Pulls of what went are refused from now on
        (:class:`~p2pinfer.errors.CheckpointRequired`)."""
        if not self._dominates_floor(header.vv) or all(
                self.floor.get(a, 0) >= s for a, s in header.vv.items()):
            return 0
        gone = 0
        with self._transaction():
            for author, seq in header.vv.items():
                if seq <= self.floor.get(author, 0):
                    continue
                gone += self.conn.execute(
                    "DELETE FROM events WHERE author=? AND seq<=? AND applied=1 AND kind NOT IN "
                    "('member.admitted', 'member.removed', 'request.logged')",
                    (author, seq)).rowcount
            self.floor = dict(header.vv)
            self._save_floor()
            self._drop_old_checkpoints()
        return gone

    def _notify(self, events: list[Event], source: str, *, changed: bool = False) -> None:
        if not events and not changed:
            return
        if changed or any(ev.kind not in USAGE_KINDS for ev in events):
            self.credentials_version += 1
        for ev in events:
            self.metrics.applied.labels(ev.kind, source).inc()
        for listener in list(self.listeners):
            listener(events, source)

    # -- reading events ---------------------------------------------------------------
    def read_range(self, author: str, after: int, limit: int) -> list[bytes]:
        """Raw applied events of ``author`` with ``seq > after``, ascending."""
        rows = self.conn.execute(
            "SELECT raw FROM events WHERE author=? AND seq>? AND applied=1 ORDER BY seq LIMIT ?",
            (author, after, limit)).fetchall()
        return [r[0] for r in rows]

    def event(self, author: str, seq: int) -> Event | None:
        row = self.conn.execute("SELECT raw FROM events WHERE author=? AND seq=? AND redacted=0",
                                (author, seq)).fetchone()
        return decode_trusted(row[0]) if row else None

    def max_seq_of(self, author: str) -> int:
        """The highest seq of ``author`` stored here, held events included."""
        row = self.conn.execute("SELECT max(seq) FROM events WHERE author=?",
                                (author,)).fetchone()
        return int(row[0] or 0)

    def lift_fence(self) -> None:
        """Drop the restore fence (the ledger decided it is safe to write)."""
        with self._transaction():
            self.conn.execute("DELETE FROM local_state WHERE key='fence'")
        self.fence = None

    # -- where members were seen (this node's own, never replicated) ----------------
    def remember_addrs(self, peer_id: str, addrs: list[str], now: float) -> None:
        """Record where member ``peer_id`` announced itself."""
        with self._transaction():
            self.conn.execute(
                "INSERT INTO peer_addrs (peer_id, addrs, seen_at) VALUES (?, ?, ?) "
                "ON CONFLICT(peer_id) DO UPDATE SET addrs=excluded.addrs, "
                "seen_at=excluded.seen_at", (peer_id, json.dumps(addrs), now))

    def known_addrs(self, limit: int = 256) -> list[tuple[str, list[str], float]]:
        """(peer id, addresses, last seen), the most recently seen first."""
        rows = self.conn.execute(
            "SELECT peer_id, addrs, seen_at FROM peer_addrs ORDER BY seen_at DESC LIMIT ?",
            (limit,)).fetchall()
        return [(p, list(json.loads(a)), float(t)) for p, a, t in rows]

    def forget_addrs(self, peer_id: str) -> None:
        with self._transaction():
            self.conn.execute("DELETE FROM peer_addrs WHERE peer_id=?", (peer_id,))

    def count_events(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM events WHERE applied=1").fetchone()[0])

    # -- maintenance ------------------------------------------------------------------
    def _rebuild_views(self) -> None:
        views.clear(self.conn)
        base = self._base()
        if base is not None:  # pruned: start from the checkpoint pruned to
            self._load_rows(base)
        self._replay_above(base.header.vv if base is not None else {})
        self._rebuild_needed = False

    def rebuild(self) -> None:
        """Recompute every materialised table from the events (a consistency
        tool: the result must equal the incremental state)."""
        with self._transaction():
            self._rebuild_needed = True

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every materialised table, sorted: equal snapshots mean
        equal state (used by tests and by convergence checks)."""
        out: dict[str, list[tuple[Any, ...]]] = {}
        for table in (*views.VIEW_TABLES, "members", "heads"):
            rows = self.conn.execute(f"SELECT * FROM {table}").fetchall()
            out[table] = sorted(rows, key=repr)
        return out

    def compact(self) -> bool:
        """Move the write-ahead log into the database file and truncate it
        (after an erasure: see :func:`.privacy.compact`)."""
        from .privacy import compact

        try:
            done = compact(self.conn)
        except sqlite3.Error as exc:
            log.warning("could not compact %s after an erasure: %s", self.path, exc)
            return False
        self.compact_due = not done
        return done

    def integrity_check(self) -> str:
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])
