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

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from ..errors import LedgerError, ReplayedEvent, StorageError
from ..identity import Identity
from ..wire import canonical_pack, unpack
from . import views
from .clock import HybridClock
from .events import MEMBER_KINDS, Event, decode, decode_trusted, sign_event
from .membership import Membership, NetworkInfo, SignedDoc, short
from .metrics import LedgerMetrics
from .migrations import migrate

__all__ = ["Store", "IngestReport"]

log = logging.getLogger(__name__)

Listener = Callable[[list[Event], str], None]


@dataclass
class IngestReport:
    """What became of a batch of events."""

    applied: list[Event] = field(default_factory=list)
    held: int = 0
    duplicates: int = 0
    rejected: list[LedgerError] = field(default_factory=list)
    gaps: dict[str, int] = field(default_factory=dict)  # author -> seq we now wait for


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
        self.held_count = 0
        self.membership = Membership(network)
        self.listeners: list[Listener] = []
        self._rebuild_needed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
            conn.execute("PRAGMA busy_timeout=5000")
            self.conn = conn
            self.db = Database(conn)
            migrate(self.db)
            self._reload()
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open the ledger store {self.path}: {exc}") from exc

    def close(self) -> None:
        self.conn.close()

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
        self.held_count = self.conn.execute(
            "SELECT count(*) FROM events WHERE applied=0").fetchone()[0]
        top = self.conn.execute("SELECT max(hlc) FROM events").fetchone()[0]
        self.clock.last = max(self.clock.last, top or 0)
        self.metrics.held.set(self.held_count)
        self._rebuild_needed = False

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        try:
            with self.db.atomic():
                yield
                if self._rebuild_needed:
                    self._rebuild_views()
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
        decoded: list[Event] = []
        for raw in raws:
            try:
                decoded.append(decode(raw, self.network.network_id))
            except LedgerError as exc:
                self._refuse(exc, None, source, report)
        if decoded:
            touched: set[str] = set()
            with self._transaction():
                # Membership documents first: an author's admission may come
                # later in the batch than its first events.
                bad_docs: dict[tuple[str, int], LedgerError] = {}
                for ev in decoded:
                    if ev.kind in MEMBER_KINDS:
                        try:
                            self._absorb(ev.body["cert" if ev.kind == "member.admitted"
                                                 else "removal"])
                        except LedgerError as exc:
                            bad_docs[ev.id] = exc
                for ev in decoded:
                    try:
                        if ev.id in bad_docs:
                            raise bad_docs[ev.id]
                        self._accept(ev, report, touched)
                    except LedgerError as exc:
                        self._refuse(exc, ev, source, report)
                self._save_heads(touched)
            self.metrics.held.set(self.held_count)
        self._notify(report.applied, source)
        return report

    def _refuse(self, exc: LedgerError, ev: Event | None, source: str,
                report: IngestReport) -> None:
        reason = self.metrics.reject(exc)
        what = f"{short(ev.author)}#{ev.seq} ({ev.kind})" if ev else "an event"
        log.warning("refused %s from %s: %s: %s", what, source, reason, exc.message)
        report.rejected.append(exc)

    def _accept(self, ev: Event, report: IngestReport, touched: set[str]) -> None:
        self.membership.check_author(ev.author, ev.kind, ev.seq, ev.wall)
        row = self.conn.execute("SELECT hash FROM events WHERE author=? AND seq=?",
                                (ev.author, ev.seq)).fetchone()
        if row is not None:
            if row[0] != ev.hash:
                raise ReplayedEvent(
                    f"{short(ev.author)}#{ev.seq} was already received with other content")
            report.duplicates += 1
            self.metrics.duplicates.inc()
            return
        head = self.heads.get(ev.author, 0)
        if ev.seq > head + 1:
            self._insert(ev, applied=False)
            self.held_count += 1
            report.held += 1
            report.gaps[ev.author] = max(report.gaps.get(ev.author, 0), ev.seq - 1)
            return
        self._insert(ev, applied=True)
        views.apply(self.conn, ev)
        self.clock.observe(ev.hlc)
        report.applied.append(ev)
        head = ev.seq
        while True:  # release held successors
            nxt = self.conn.execute(
                "SELECT raw FROM events WHERE author=? AND seq=? AND applied=0",
                (ev.author, head + 1)).fetchone()
            if nxt is None:
                break
            held = decode_trusted(nxt[0])
            self.conn.execute("UPDATE events SET applied=1 WHERE author=? AND seq=?",
                              (held.author, held.seq))
            views.apply(self.conn, held)
            self.clock.observe(held.hlc)
            report.applied.append(held)
            self.held_count -= 1
            head = held.seq
        self.heads[ev.author] = head
        touched.add(ev.author)

    def _insert(self, ev: Event, *, applied: bool) -> None:
        self.conn.execute(
            "INSERT INTO events (author, seq, hlc, kind, hash, raw, applied, received_at) "
            "VALUES (?,?,?,?,?,?,?,?)",
            (ev.author, ev.seq, ev.hlc, ev.kind, ev.hash, ev.raw, int(applied), self.wall()))

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
            this node may not write that kind; StorageError: nothing was written.
        """
        me = identity.peer_id
        out: list[Event] = []
        touched: set[str] = set()
        with self._transaction():
            for kind, body in items:
                seq = self.heads.get(me, 0) + 1
                hlc = self.clock.now()
                ev = sign_event(identity, self.network.network_id, seq, hlc, kind, body)
                if kind in MEMBER_KINDS:
                    self._absorb(body["cert" if kind == "member.admitted" else "removal"])
                self.membership.check_author(me, kind, seq, ev.wall)
                self._insert(ev, applied=True)
                views.apply(self.conn, ev)
                self.heads[me] = seq
                touched.add(me)
                out.append(ev)
            self._save_heads(touched)
        self._notify(out, "local")
        return out

    def _notify(self, events: list[Event], source: str) -> None:
        if not events:
            return
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
        row = self.conn.execute("SELECT raw FROM events WHERE author=? AND seq=?",
                                (author, seq)).fetchone()
        return decode_trusted(row[0]) if row else None

    def count_events(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM events WHERE applied=1").fetchone()[0])

    # -- maintenance ------------------------------------------------------------------
    def _rebuild_views(self) -> None:
        views.clear(self.conn)
        for (raw,) in self.conn.execute(
                "SELECT raw FROM events WHERE applied=1 ORDER BY author, seq").fetchall():
            views.apply(self.conn, decode_trusted(raw))
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

    def integrity_check(self) -> str:
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])
