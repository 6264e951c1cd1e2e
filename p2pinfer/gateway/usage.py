"""Usage tracking: what each request cost, written to the replicated ledger.

A gateway records, for every request it admitted:

- a ``usage`` counter delta per (user, API key, UTC hour): one request and
  the exact tokens the backend reported; the ledger sums the deltas of all
  gateways into ``usage_stats`` (per user, key and day);
- a ``request.logged`` row: prompt *hash* only, model, latency, tokens,
  status (``success``, ``error``, ``timeout``, ``cancelled``, ``rate_limited``);
- ``apikey.used``: the key's ``last_used_at``.

Writing one ledger event per request would flood gossip, so the recorder
batches: everything recorded during ``flush_interval`` seconds goes out as
at most three events in one transaction. A flush that fails is retried with
the same batch (nothing is dropped); :meth:`run` flushes one last time when
the gateway stops.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import trio

from ..errors import P2PInferError

__all__ = ["UsageRecorder", "prompt_hash"]

log = logging.getLogger(__name__)

MAX_ROWS_PER_EVENT = 500
MAX_ENTRIES_PER_EVENT = 1000


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
            out.append(("request.logged", {"rows": self.rows[i : i + MAX_ROWS_PER_EVENT]}))
        used = [{"key_id": k, "at": at} for k, at in self.used.items()]
        for i in range(0, len(used), MAX_ENTRIES_PER_EVENT):
            out.append(("apikey.used", {"entries": used[i : i + MAX_ENTRIES_PER_EVENT]}))
        return out


class UsageRecorder:
    """Batches usage, request logs and key use into ledger events."""

    def __init__(self, ledger: Any, *, flush_interval: float = 1.0) -> None:
        self.ledger = ledger
        self.flush_interval = flush_interval
        self._pending = _Pending()
        self.recorded = 0
        self.flushed_events = 0
        self.flush_failures = 0
        self._flushed = trio.Event()

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
        now = time.time() if now is None else now
        if counted:
            hour = int(now // 3600) * 3600
            slot = self._pending.usage.setdefault((user_id, api_key_id, hour), [0, 0])
            slot[0] += 1
            slot[1] += max(0, int(tokens))
        self._pending.rows.append({
            "id": str(uuid.uuid4()),
            "user_id": user_id,
            "api_key_id": api_key_id,
            "prompt_hash": prompt_sha256,
            "model_used": model[:200] or "-",
            "response_time_ms": round(float(latency_ms), 1),
            "tokens_used": max(0, int(tokens)),
            "status": status[:32],
            "created_at": now,
        })
        if api_key_id is not None:
            self._pending.used[api_key_id] = now
        self.recorded += 1

    def pending(self) -> int:
        return len(self._pending.rows)

    def flush(self) -> int:
        """Write what is pending to the ledger now; returns events written.

        On failure the batch stays pending (and is merged with what comes
        next), so nothing is lost.
        """
        if self._pending.empty():
            return 0
        batch, self._pending = self._pending, _Pending()
        try:
            events = self.ledger.append_many(batch.events())
        except P2PInferError:
            self.flush_failures += 1
            log.exception("writing usage to the ledger failed; will retry")
            self._merge_back(batch)
            return 0
        self.flushed_events += len(events)
        done, self._flushed = self._flushed, trio.Event()
        done.set()
        return len(events)

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
        task_status.started()
        try:
            while True:
                await trio.sleep(self.flush_interval)
                self.flush()
        finally:
            self.flush()  # synchronous: runs even while being cancelled
