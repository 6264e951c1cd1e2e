"""Choosing a worker for each request, and failing over when one dies.

Candidates for a model come from discovery (nodes whose signed descriptor
lists the model), cached for ``candidate_ttl`` seconds and refreshed in the
background for models in use. Among the healthy candidates the router uses
the **power of two choices**: pick two at random and send the request to the
less loaded one, where load is the worker's own figures from its descriptor
(queue depth, requests in flight, minus free slots) plus what this gateway
has sent it since, with the latency average as tie-break. It spreads load
almost as well as asking every worker, without asking any.

A worker that fails to answer (unreachable, stream broken, backend down,
overloaded) *before the first token* is skipped and the request goes to
the next choice, up to ``max_attempts`` workers; a worker that failed at
the transport level is cooled down for ``cooldown`` seconds. Once tokens
have reached the client a request is never retried (the client would see
text twice): it ends with :class:`~p2pinfer.errors.StreamInterrupted`. A
whole-answer request (``"stream": false``) has its one chunk only once the
answer is complete, so it fails over at any point of the generation.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ..discovery import Descriptor
from ..errors import (
    BackendUnavailable,
    CallError,
    DeadlineExceeded,
    HandlerError,
    NoWorkerAvailable,
    Overloaded,
    P2PInferError,
    StreamInterrupted,
    UnknownModel,
)
from ..prompts import missing_capability

if TYPE_CHECKING:
    from ..context import RoleContext

__all__ = ["WorkerRouter", "RoutedStream", "WorkerStats"]

log = logging.getLogger(__name__)

# Errors after which another worker may well succeed.
RETRYABLE = (CallError, BackendUnavailable, Overloaded, UnknownModel, HandlerError)
# ...of which these say the worker itself is in trouble: cool it down.
COOLDOWN = (CallError, BackendUnavailable, HandlerError)


@dataclass
class WorkerStats:
    """What this gateway has seen of one worker."""

    in_flight: int = 0
    latency_ewma: float | None = None
    failures: int = 0
    successes: int = 0
    cooled_until: float = 0.0

    def observe_latency(self, seconds: float, alpha: float = 0.2) -> None:
        self.latency_ewma = (seconds if self.latency_ewma is None
                             else alpha * seconds + (1 - alpha) * self.latency_ewma)


@dataclass
class RoutedStream:
    """Where a request went and how it ended (filled in while streaming)."""

    model: str
    worker: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    trailer: dict[str, Any] | None = None
    first_token_at: float | None = None


def _model_entry(desc: Descriptor, model: str) -> dict[str, Any] | None:
    """The worker's descriptor entry for ``model`` (by name or alias)."""
    for entry in desc.models():
        if model in [entry.get("name"), *(entry.get("aliases") or [])]:
            return entry
    return None


def _model_load(desc: Descriptor, model: str) -> float:
    entry = _model_entry(desc, model)
    if entry is None:
        return 0.0
    queue = float(entry.get("queue_depth") or 0)
    busy = float(entry.get("in_flight") or 0)
    free = float(entry.get("free_slots") or 0)
    return queue + busy - free


def _capabilities(desc: Descriptor, model: str) -> frozenset[str]:
    """What the worker announces ``model`` can do (chat alone when a node
    older than capabilities does not say)."""
    entry = _model_entry(desc, model)
    if entry is None:
        return frozenset()
    caps = entry.get("capabilities")
    return frozenset(str(c) for c in caps) if isinstance(caps, list) else frozenset({"chat"})


def _merge_ready(chunk: Any, chunks: Any) -> list[Any]:
    """``chunk`` plus the text of every chunk that has already arrived.

    Tokens the worker sent while this relay was busy leave as one frame
    instead of one each; nothing waits for tokens not yet here. A chunk that
    is not plain text (``{"delta": str}``) is passed on as it is.
    """
    out: list[Any] = [chunk]
    while _plain(out[-1]):
        try:
            nxt = chunks.next_nowait()
        except (trio.WouldBlock, StopAsyncIteration):
            break
        if _plain(nxt):
            out[-1] = {"delta": out[-1]["delta"] + nxt["delta"]}
        else:
            out.append(nxt)
    return out


def _plain(chunk: Any) -> bool:
    return isinstance(chunk, dict) and len(chunk) == 1 and isinstance(chunk.get("delta"), str)


class WorkerRouter:
    """Routes prompts to workers found through ``node.discovery``."""

    def __init__(
        self,
        node: RoleContext,
        *,
        candidate_ttl: float = 2.0,
        cooldown: float = 10.0,
        max_attempts: int = 3,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        self.candidate_ttl = candidate_ttl
        self.cooldown = cooldown
        self.max_attempts = max_attempts
        self.rng = rng or random.Random()
        self.stats: dict[str, WorkerStats] = {}
        self._candidates: dict[str, tuple[float, list[Descriptor]]] = {}
        self._in_use: dict[str, float] = {}
        self._refreshing: dict[str, trio.Event] = {}

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Keep candidate lists of recently used models fresh."""
        task_status.started()
        while True:
            await trio.sleep(self.candidate_ttl)
            now = trio.current_time()
            for model, last_used in list(self._in_use.items()):
                if now - last_used > 60:
                    del self._in_use[model]
                    self._candidates.pop(model, None)
                    continue
                with trio.move_on_after(5):
                    await self._refresh(model)

    # -- candidates ------------------------------------------------------------------
    async def _refresh(self, model: str) -> list[Descriptor]:
        pending = self._refreshing.get(model)
        if pending is not None:  # one lookup at a time per model
            await pending.wait()
            return self._candidates.get(model, (0.0, []))[1]
        done = self._refreshing[model] = trio.Event()
        try:
            found = await self.node.discovery.find_model(model)
            members = [d for d in found if self.node.is_member(d.peer_id)]
            self._candidates[model] = (trio.current_time() + self.candidate_ttl, members)
            return members
        finally:
            del self._refreshing[model]
            done.set()

    async def candidates(self, model: str) -> list[Descriptor]:
        """Member workers serving ``model`` (cached for ``candidate_ttl``)."""
        self._in_use[model] = trio.current_time()
        cached = self._candidates.get(model)
        if cached is not None and cached[0] > trio.current_time() and cached[1]:
            return cached[1]
        return await self._refresh(model)

    async def capable(self, model: str, needs: frozenset[str]) -> list[Descriptor]:
        """The candidates for ``model`` whose model announces ``needs``.

        Raises:
            MissingCapability: workers serve ``model``, none of them can.
        """
        candidates = await self.candidates(model)
        if not needs or not candidates:
            return candidates
        able = [d for d in candidates if needs <= _capabilities(d, model)]
        if not able:
            lacking = sorted(needs - _capabilities(candidates[0], model),
                             key=lambda n: (n != "chat", n)) or sorted(needs)
            raise missing_capability(model, lacking[0])
        return able

    def workers(self) -> dict[str, list[str]]:
        """The gateway's current view: model -> worker peer ids."""
        return {m: [d.peer_id for d in c[1]] for m, c in self._candidates.items()}

    # -- choice ------------------------------------------------------------------------
    def _score(self, desc: Descriptor, model: str) -> tuple[float, float]:
        stats = self.stats.get(desc.peer_id)
        local = stats.in_flight if stats else 0
        latency = stats.latency_ewma if stats and stats.latency_ewma is not None else 0.0
        return (_model_load(desc, model) + local, latency)

    def choose(self, model: str, candidates: list[Descriptor], exclude: set[str]) -> Descriptor:
        now = trio.current_time()
        usable = [d for d in candidates if d.peer_id not in exclude]
        healthy = [d for d in usable
                   if self.stats.get(d.peer_id, WorkerStats()).cooled_until <= now]
        pool = healthy or usable  # all cooling down: still try one rather than fail
        if not pool:
            raise NoWorkerAvailable(f"no worker serves model {model!r}",
                                    data={"model": model, "retry_after": 2.0})
        if len(pool) == 1:
            return pool[0]
        a, b = self.rng.sample(pool, 2)
        return a if self._score(a, model) <= self._score(b, model) else b

    def _stats(self, peer_id: str) -> WorkerStats:
        stats = self.stats.get(peer_id)
        if stats is None:
            stats = self.stats[peer_id] = WorkerStats()
        return stats

    # -- streaming ---------------------------------------------------------------------
    async def stream(
        self, model: str, params: dict[str, Any], route: RoutedStream,
        needs: frozenset[str] = frozenset(), *, method: str = "processPrompt",
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Yield the worker's chunks of ``method`` (``processPrompt`` or
        ``embed``); fail over before the first one.

        ``route`` is filled in: the worker that answered, every attempt, and
        the trailer (usage, finish reason) once the stream ends. ``needs``:
        capabilities the request takes (only workers whose model announces
        them are tried; if no worker's does, MissingCapability).
        """
        tried: set[str] = set()
        last_error: P2PInferError | None = None
        candidates = await self.capable(model, needs)
        while len(tried) < self.max_attempts:
            try:
                worker = self.choose(model, candidates, tried)
            except NoWorkerAvailable:
                if tried:
                    break
                raise
            tried.add(worker.peer_id)
            stats = self._stats(worker.peer_id)
            started = trio.current_time()
            streamed = False
            stats.in_flight += 1
            try:
                async with self.node.rpc.stream(worker.peer_id, method, params) as chunks:
                    async for chunk in chunks:
                        if not streamed:
                            streamed = True
                            route.worker = worker.peer_id
                            route.first_token_at = trio.current_time()
                        for merged in _merge_ready(chunk, chunks):
                            yield merged
                    route.worker = worker.peer_id
                    route.trailer = chunks.trailer if isinstance(chunks.trailer, dict) else {}
                stats.successes += 1
                stats.observe_latency(trio.current_time() - started)
                route.attempts.append({"worker": worker.peer_id, "outcome": "ok"})
                return
            except DeadlineExceeded:
                raise
            except RETRYABLE as exc:
                route.attempts.append({"worker": worker.peer_id, "outcome": type(exc).__name__})
                stats.failures += 1
                if isinstance(exc, COOLDOWN):
                    stats.cooled_until = trio.current_time() + self.cooldown
                    self._candidates.pop(model, None)
                if streamed:
                    raise StreamInterrupted(
                        f"worker {worker.peer_id[-8:]} failed after streaming began: "
                        f"{exc.message}",
                        data={"worker": worker.peer_id, "cause": exc.code},
                    ) from exc
                log.info("worker %s failed before the first token (%s); trying another",
                         worker.peer_id, exc.message)
                last_error = exc
                if isinstance(exc, UnknownModel):
                    candidates = await self._refresh(model)
            finally:
                stats.in_flight -= 1
        if last_error is not None:
            if isinstance(last_error, Overloaded):
                raise last_error
            raise NoWorkerAvailable(
                f"every worker tried for {model!r} failed: {last_error.message}",
                data={"model": model, "retry_after": 2.0, "attempts": route.attempts},
            ) from last_error
        raise NoWorkerAvailable(f"no worker serves model {model!r}",
                                data={"model": model, "retry_after": 2.0})
