"""Usage tracking: what each request cost, written to the replicated ledger.

A gateway records, for every request it admitted:

- a ``usage`` counter delta per (user, API key, UTC hour): one request and
  the exact tokens the backend reported; the ledger sums the deltas of all
  gateways into ``usage_stats`` (per user, key and day);
- a request log row (``log.requests``, the ledger's log lane: kept by this
  gateway and its keepers, see :mod:`p2pinfer.ledger.logs`): prompt *hash*
  only, model, latency, tokens, status (``success``, ``error``,
  ``timeout``, ``cancelled``, ``rate_limited``);
- ``apikey.used``: the key's ``last_used_at``, written at most once per
  :data:`KEY_USE_INTERVAL` per key while the gateway is busy (every member
  stores every key-use entry: with many active keys, one a flush was a
  third of what a worker stored per request); uses in between are folded
  into the next write, which comes at the latest when the interval passes
  or when a flush has nothing else to write.

Writing one ledger event per request would flood gossip, so the recorder
batches: everything recorded during ``flush_interval`` seconds goes out as
at most three events in one transaction, or sooner once :data:`FLUSH_ROWS`
requests are waiting: a flush runs on the event loop, and a 1,500-row batch
(one second at full speed) held it for 20-45 ms, in every in-flight
request's latency. A flush that fails is retried with
the same batch (nothing is dropped); :meth:`run` flushes one last time when
the gateway stops.

**The journal.** A gateway killed between two flushes (SIGKILL, OOM, a
crash) would lose the usage of the requests it finished in that interval,
answers its clients already have. So each record is also appended, as one
JSON line, to a journal file next to the database (``<db>-usage``, mode
0600) before the request's end reaches the client; a successful flush
empties it. At start, :meth:`UsageRecorder.recover` puts the journal's
records back in the batch, skipping those whose request log row is already
in the ledger (a crash between a flush's commit and the journal's
truncation), and flushes them. A ``write`` to the page cache survives the
process being killed; like the ledger with ``synchronous = "normal"``, it
may not survive power loss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cachetools import TTLCache

from ..errors import P2PInferError

__all__ = ["UsageRecorder", "prompt_hash"]

log = logging.getLogger(__name__)

# Rows per log.requests event: each keeper applies an event in one step of
# its event loop (about 2.5 ms per 50 rows), so a flush of 200 rows reaches
# them as four short steps rather than one long one.
MAX_ROWS_PER_EVENT = 50
FLUSH_ROWS = 200  # flush early at this many rows: a few ms of event loop each
MAX_ENTRIES_PER_EVENT = 1000
KEY_USE_INTERVAL = 60.0  # seconds: a key's last use is written at most this often
MAX_KEYS_TRACKED = 100_000  # keys remembered as written; beyond, the oldest are written again


def prompt_hash(request: dict[str, Any]) -> str:
    """SHA-256 of the prompt (or messages) and system text; the prompt itself
    is never stored."""
    material = {k: request.get(k) for k in ("prompt", "system", "messages") if k in request}
    blob = json.dumps(material, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class _Pending:
    usage: dict[tuple[str, str | None, int], list[int]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    used: dict[str, float] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.usage or self.rows or self.used)

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        entries = [
            {"user_id": user, "key_id": key, "hour": hour, "requests": req, "tokens": tok}
            for (user, key, hour), (req, tok) in self.usage.items()
        ]
        for i in range(0, len(entries), MAX_ENTRIES_PER_EVENT):
            out.append(("usage", {"entries": entries[i : i + MAX_ENTRIES_PER_EVENT]}))
        for i in range(0, len(self.rows), MAX_ROWS_PER_EVENT):
            out.append(("log.requests", {"rows": self.rows[i : i + MAX_ROWS_PER_EVENT]}))
        used = [{"key_id": k, "at": at} for k, at in self.used.items()]
        for i in range(0, len(used), MAX_ENTRIES_PER_EVENT):
            out.append(("apikey.used", {"entries": used[i : i + MAX_ENTRIES_PER_EVENT]}))
        return out


class UsageRecorder:
    """Batches usage, request logs and key use into ledger events.

    Args:
        ledger: the node's ledger.
        flush_interval: seconds between two batches.
        journal: the journal file (see the module docstring); None keeps
            the batch in memory only.
    """

    def __init__(self, ledger: Any, *, flush_interval: float = 1.0,
                 journal: Path | None = None, flush_rows: int = FLUSH_ROWS,
                 key_use_interval: float = KEY_USE_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ledger = ledger
        # keys whose use was written within key_use_interval, and the later
        # uses of those keys that wait for it to pass (latest time per key)
        self._key_written: TTLCache[str, bool] = TTLCache(
            maxsize=MAX_KEYS_TRACKED, ttl=key_use_interval, timer=clock)
        self._deferred_used: dict[str, float] = {}
        self.flush_interval = flush_interval
        self.flush_rows = flush_rows
        self._full = trio.Event()
        self._pending = _Pending()
        self.recorded = 0
        self.flushed_events = 0
        self.flush_failures = 0
        self.recovered = 0
        self._flushed = trio.Event()
        self.journal = journal
        self._journal_fd: int | None = None
        self._journal_failed = False

    def record(
        self,
        *,
        user_id: str,
        api_key_id: str | None,
        model: str,
        prompt_sha256: str,
        status: str,
        tokens: int,
        latency_ms: float,
        counted: bool = True,
        now: float | None = None,
    ) -> None:
        """Record one request. ``counted`` requests (admitted ones) add to the
        usage counters; every request gets a log row."""
        entry = {
            "id": str(uuid.uuid4()),
            "user_id": user_id,
            "api_key_id": api_key_id,
            "model": model[:200] or "-",
            "prompt_hash": prompt_sha256,
            "status": status[:32],
            "tokens": max(0, int(tokens)),
            "latency_ms": round(float(latency_ms), 1),
            "counted": counted,
            "at": time.time() if now is None else now,
        }
        self._journal_write(entry)
        self._add(entry)

    def _add(self, entry: dict[str, Any]) -> None:
        now = float(entry["at"])
        if entry["counted"]:
            hour = int(now // 3600) * 3600
            slot = self._pending.usage.setdefault(
                (entry["user_id"], entry["api_key_id"], hour), [0, 0])
            slot[0] += 1
            slot[1] += entry["tokens"]
        self._pending.rows.append({
            "id": entry["id"],
            "user_id": entry["user_id"],
            "api_key_id": entry["api_key_id"],
            "prompt_hash": entry["prompt_hash"],
            "model_used": entry["model"],
            "response_time_ms": entry["latency_ms"],
            "tokens_used": entry["tokens"],
            "status": entry["status"],
            "created_at": now,
        })
        if entry["api_key_id"] is not None:
            key_id = entry["api_key_id"]
            self._pending.used[key_id] = max(now, self._pending.used.get(key_id, now))
        self.recorded += 1
        if len(self._pending.rows) >= self.flush_rows:
            self._full.set()

    def pending(self) -> int:
        """Records and held key uses not yet in the ledger."""
        return len(self._pending.rows) + len(self._deferred_used)

    # -- the journal --------------------------------------------------------------------
    def _journal_open(self) -> int | None:
        if self.journal is None or self._journal_failed:
            return None
        if self._journal_fd is None:
            try:
                self._journal_fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND
                                           | os.O_CREAT, 0o600)
            except OSError as exc:
                self._journal_trouble("open", exc)
                return None
        return self._journal_fd

    def _journal_trouble(self, what: str, exc: OSError) -> None:
        # Usage stays in memory and is flushed as usual; only a crash before
        # the next flush would lose it. Say so once, not per request.
        if not self._journal_failed:
            log.error("cannot %s the usage journal %s (%s); usage is kept in memory "
                      "until the next flush", what, self.journal, exc)
        self._journal_failed = True
        self._journal_close()

    def _journal_close(self) -> None:
        if self._journal_fd is not None:
            try:
                os.close(self._journal_fd)
            except OSError:
                pass
            self._journal_fd = None

    def _journal_write(self, entry: dict[str, Any]) -> None:
        fd = self._journal_open()
        if fd is None:
            return
        line = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
        try:
            os.write(fd, line)
        except OSError as exc:
            self._journal_trouble("write", exc)

    def _journal_clear(self) -> None:
        """Everything journalled is in the ledger now."""
        if self._journal_failed:
            # try again from a clean file: the pending batch was just written
            self._journal_failed = False
        fd = self._journal_open()
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError as exc:
            self._journal_trouble("truncate", exc)

    def recover(self) -> int:
        """Put journalled records that never reached the ledger back in the
        batch (call before serving, then :meth:`flush`); returns how many."""
        if self.journal is None:
            return 0
        try:
            data = self.journal.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.error("cannot read the usage journal %s: %s", self.journal, exc)
            return 0
        found = 0
        for line in data.splitlines():
            try:
                entry = json.loads(line)
                row_id = str(entry["id"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line: its request never finished
            if self.ledger.has_request_log(row_id):
                continue  # flushed; the journal was not emptied before the crash
            self._add(entry)
            found += 1
        self.recovered += found
        if found:
            log.warning("recovered the usage of %d requests from %s", found, self.journal)
        return found

    # -- flushing --------------------------------------------------------------------------
    def flush(self, *, force: bool = False) -> int:
        """Write what is pending to the ledger now; returns events written.

        On failure the batch stays pending (and is merged with what comes
        next), so nothing is lost. A key's use waits for its
        :data:`KEY_USE_INTERVAL` while other records are being written; a
        flush with nothing else to write, or ``force``, writes it.
        """
        idle = self._pending.empty()
        if idle and not self._deferred_used:
            return 0
        batch, self._pending = self._pending, _Pending()
        # nothing else to write: held key uses go now rather than later
        self._fold_key_use(batch, force or idle)
        try:
            events = self.ledger.append_many(batch.events())
        except P2PInferError:
            self.flush_failures += 1
            log.exception("writing usage to the ledger failed; will retry")
            self._merge_back(batch)
            return 0
        for key_id in batch.used:
            self._key_written[key_id] = True
        self._journal_clear()
        self.flushed_events += len(events)
        done, self._flushed = self._flushed, trio.Event()
        done.set()
        return len(events)

    def _fold_key_use(self, batch: _Pending, force: bool) -> None:
        """Add the waiting key uses to ``batch``, then hold back those of
        keys written within the interval (all go when ``force``)."""
        for key_id, at in self._deferred_used.items():
            batch.used[key_id] = max(at, batch.used.get(key_id, at))
        self._deferred_used = {}
        if force:
            return
        for key_id in [k for k in batch.used if k in self._key_written]:
            self._deferred_used[key_id] = batch.used.pop(key_id)

    def _merge_back(self, batch: _Pending) -> None:
        newer = self._pending
        self._pending = batch
        for key, (req, tok) in newer.usage.items():
            slot = self._pending.usage.setdefault(key, [0, 0])
            slot[0] += req
            slot[1] += tok
        self._pending.rows.extend(newer.rows)
        self._pending.used.update(newer.used)

    async def wait_flushed(self) -> None:
        """Until everything recorded so far is in the ledger."""
        while not self._pending.empty():
            await self._flushed.wait()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.recover()
        self.flush()
        task_status.started()
        try:
            while True:
                with trio.move_on_after(self.flush_interval):
                    await self._full.wait()
                self._full = trio.Event()
                failures = self.flush_failures
                self.flush()
                if self.flush_failures > failures:  # no early retries of a failing store
                    await trio.sleep(self.flush_interval)
        finally:
            self.flush(force=True)  # synchronous: runs even while being cancelled
            self._journal_close()
