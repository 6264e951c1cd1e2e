"""The engine: several models on one node, slots, a bounded queue, the cache.

Each served model has a name, aliases, a backend, ``slots`` (generations at
once, from the backend) and ``max_queue`` (requests allowed to wait for a
slot). A request for a model whose slots are all busy and whose queue is
full fails at once with :class:`~p2pinfer.errors.Overloaded` and a
``retry_after`` hint (the queue ahead of it times the model's average
request duration, divided by its slots). Waiting is fair between users:
a freed slot goes to the request whose user (its ``share``) holds the
fewest slots, first come, first served among equals, and a full queue makes
room for a lighter user by refusing the heaviest user's newest waiter
(:mod:`.slots`). A cancelled request, queued or running, gives its place back
before its cancellation completes (see :mod:`.llamacpp` for how a running
generation stops within a token).

Deterministic requests (temperature 0 or a seed) are looked up in the
:class:`~.cache.ResponseCache` first; a hit sends the stored answer as one
chunk, without taking a slot.

Per model the engine keeps moving averages (EWMA) of decode speed
(tokens/s after the first token), time to first token (queue wait
included: what a caller sees) and request duration, and counts outcomes
(plus the total duration of finished requests, from which a scaling
monitor takes the average over its window).

Slots can be resized while serving (:meth:`InferenceEngine.resize`): the
backend grows first, then the :class:`~.slots.SlotPool` admits more;
shrinking stops admitting first, and requests that hold a slot always
finish (see :mod:`.slots`).
:meth:`InferenceEngine.describe` is the compact form that goes into the
node's signed descriptor, for gateways to route by load.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import trio

from ..errors import (
    BackendUnavailable,
    MalformedBackendResponse,
    Overloaded,
    P2PInferError,
    UnknownModel,
)
from ..prompts import EmbedRequest, PromptRequest, missing_capability
from .backend import (
    Backend,
    GenerationRequest,
    GenerationResult,
    ModelState,
    TextChunk,
    ToolCall,
)
from .cache import CachedAnswer, ResponseCache, cache_key
from .metrics import UNKNOWN_MODEL, InferenceMetrics
from .slots import Displaced, SlotPool

__all__ = ["Completion", "Ewma", "InferenceEngine", "ServedModel"]

log = logging.getLogger(__name__)

OUTCOMES = ("success", "error", "cancelled", "overloaded", "cached")


@dataclass(frozen=True)
class Completion:
    """The last event of :meth:`InferenceEngine.generate`. Durations in seconds."""

    model: str
    backend: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    usage_exact: bool
    cached: bool
    ttft: float | None
    latency: float
    queued: float
    tool_calls: tuple[ToolCall, ...] = ()

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class EmbeddingResult:
    """What :meth:`InferenceEngine.embed` returns. Durations in seconds."""

    model: str
    backend: str
    vectors: list[list[float]]
    prompt_tokens: int
    latency: float
    queued: float


class Ewma:
    """An exponentially weighted moving average (None until the first sample)."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def update(self, sample: float) -> None:
        self.value = sample if self.value is None else (
            self.alpha * sample + (1 - self.alpha) * self.value)


class ServedModel:
    """A backend as the engine serves it: slots, queue and figures."""

    def __init__(self, backend: Backend, *, aliases: Iterable[str] = (),
                 max_queue: int = 32) -> None:
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.backend = backend
        self.name = backend.name
        self.aliases = tuple(aliases)
        self.max_queue = max_queue
        self.pool = SlotPool(backend.slots)
        self.resize_lock = trio.Lock()
        self.waiting = 0
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.tok_s = Ewma()
        self.ttft = Ewma()
        self.latency = Ewma()
        self.completed = 0  # finished generations (not cache hits) ...
        self.latency_total = 0.0  # ... and their summed duration, seconds

    @property
    def slots(self) -> int:
        """Generations allowed at once (may change: :meth:`InferenceEngine.resize`)."""
        return self.pool.capacity

    @property
    def free_slots(self) -> int:
        return self.pool.free

    @property
    def in_flight(self) -> int:
        return self.pool.in_use

    def retry_after(self) -> float:
        """Seconds until a place in the queue is likely to free up."""
        per_request = self.latency.value or 1.0
        return round(min(60.0, max(0.05, per_request * (self.waiting + 1) / self.slots)), 3)

    def load(self) -> dict[str, Any]:
        """The figures a gateway routes by."""
        out = {
            "name": self.name,
            "aliases": list(self.aliases),
            "backend": self.backend.kind,
            "capabilities": sorted(self.backend.capabilities),
            "created": int(self.backend.created),
            "status": self.backend.state.value,
            "context_length": self.backend.context_length,
            "slots": self.slots,
            "free_slots": self.free_slots,
            "in_flight": self.in_flight,
            "queue_depth": self.waiting,
            "max_queue": self.max_queue,
            "tok_s": _round(self.tok_s.value, 1),
            "ttft_ms": _round(self.ttft.value, 1, scale=1000.0),
        }
        variant = self.backend.variant()
        if variant is not None:
            out["runner"] = variant
        return out


def _round(value: float | None, digits: int, *, scale: float = 1.0) -> float | None:
    return None if value is None else round(value * scale, digits)


class InferenceEngine:
    """Routes prompts to models by name or alias. Add models, then :meth:`run`.

    Args:
        cache: the response cache (None: no caching).
        metrics: collectors to update (None: none).
    """

    def __init__(self, *, cache: ResponseCache | None = None,
                 metrics: InferenceMetrics | None = None) -> None:
        self.cache = cache
        self.metrics = metrics
        self.models: dict[str, ServedModel] = {}
        self._names: dict[str, ServedModel] = {}
        self.default_model: str | None = None
        self.running = False

    # -- configuration ---------------------------------------------------------------
    def add_model(self, backend: Backend, *, aliases: Iterable[str] = (), max_queue: int = 32,
                  default: bool = False) -> ServedModel:
        """Serve ``backend`` under its name and ``aliases``; the first model added
        (or the one marked ``default``) answers requests that name none."""
        model = ServedModel(backend, aliases=aliases, max_queue=max_queue)
        for name in (model.name, *model.aliases):
            if name in self._names:
                raise ValueError(f"model name {name!r} is used twice")
        self.models[model.name] = model
        for name in (model.name, *model.aliases):
            self._names[name] = model
        if default or self.default_model is None:
            self.default_model = model.name
        if self.metrics is not None:
            self.metrics.watch_model(
                model.name,
                queue_depth=lambda: model.waiting,
                in_flight=lambda: model.in_flight,
                free_slots=lambda: model.free_slots,
                slots=lambda: model.slots,
            )
        return model

    def names(self) -> list[str]:
        """Every name a request may use: model names and aliases."""
        return list(self._names)

    def resolve(self, name: str | None) -> ServedModel:
        """The model called ``name`` (None: the default model).

        Raises:
            UnknownModel: no model or alias of that name on this node.
        """
        key = name if name is not None else self.default_model
        model = self._names.get(key) if key is not None else None
        if model is None:
            known = ", ".join(sorted(self._names)) or "none"
            raise UnknownModel(f"no model {name!r} on this node (serving: {known})",
                               data={"model": str(name)[:128]})
        return model

    # -- lifecycle ---------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start every backend; serve until cancelled."""
        async with trio.open_nursery() as nursery:
            for model in self.models.values():
                await nursery.start(model.backend.run)
            self.running = True
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self.running = False

    async def wait_settled(self) -> dict[str, str]:
        """Wait until every model is loaded or failed; their states by name."""
        return {name: (await m.backend.wait_settled()).value for name, m in self.models.items()}

    # -- serving -------------------------------------------------------------------------
    async def generate(
        self, request: PromptRequest
    ) -> AsyncGenerator[TextChunk | Completion, None]:
        """Answer ``request``: :class:`TextChunk` events as they are generated,
        then one :class:`Completion`.

        Raises:
            UnknownModel, MissingCapability, Overloaded, InvalidParams, or
            the backend's InferenceError.
        """
        started = trio.current_time()
        try:
            model = self.resolve(request.model)
        except UnknownModel:
            if self.metrics is not None:
                self.metrics.requests.labels(UNKNOWN_MODEL, "error").inc()
            raise
        if not self.running:
            raise BackendUnavailable("the inference engine is not running")
        params = request.params
        for needed in sorted(request.needs, key=lambda n: n != "chat"):  # "chat" named first
            if needed not in model.backend.capabilities:
                self._count(model, "error")
                raise missing_capability(model.name, needed)
        key = None
        if self.cache is not None and request.use_cache and params.deterministic \
                and not params.calls_tools and not params.logprobs:
            key = cache_key(model.name, request.messages, params)
            answer = self.cache.get(key)
            if answer is not None:
                self._count_cache(model, hit=True)
                async for replayed in self._replay(model, answer, started):
                    yield replayed
                return
            self._count_cache(model, hit=False)

        share = request.share
        await self._acquire(model, share)
        acquired = trio.current_time()
        outcome = "error"
        chunks: list[str] = []
        first: float | None = None
        result: GenerationResult | None = None
        try:
            events = model.backend.generate(GenerationRequest(request.messages, params))
            async with aclosing(events):
                async for event in events:
                    if isinstance(event, TextChunk):
                        if first is None:
                            first = trio.current_time()
                        chunks.append(event.text)
                        yield event
                    else:
                        result = event
            if result is None:
                raise MalformedBackendResponse(f"model {model.name}: no result from the backend")
            outcome = "cancelled" if result.finish_reason == "cancelled" else "success"
        except BaseException as exc:
            outcome = "error" if isinstance(exc, Exception) else "cancelled"
            if isinstance(exc, P2PInferError):
                log.info("model %s: %s: %s", model.name, type(exc).__name__, exc.message)
            raise
        finally:
            model.pool.release(share)
            self._count(model, outcome)
        ended = trio.current_time()
        self._record(model, result, started, first, ended)
        if key is not None and self.cache is not None and result.finish_reason in (
                "stop", "length"):
            self.cache.put(key, CachedAnswer("".join(chunks), result.prompt_tokens,
                                             result.completion_tokens, result.finish_reason,
                                             result.usage_exact))
        yield Completion(
            model=model.name,
            backend=model.backend.kind,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            finish_reason=result.finish_reason,
            usage_exact=result.usage_exact,
            cached=False,
            ttft=None if first is None else first - started,
            latency=ended - started,
            queued=acquired - started,
            tool_calls=result.tool_calls,
        )

    async def _acquire(self, model: ServedModel, share: str) -> None:
        """A slot of ``model`` for ``share``, waiting in its queue if need be."""
        if model.free_slots == 0 and model.waiting >= model.max_queue \
                and not model.pool.make_room(share):
            self._count(model, "overloaded")
            raise self._overloaded(model)
        try:
            model.pool.acquire_nowait(share)
        except trio.WouldBlock:
            model.waiting += 1  # only requests that really wait count as queued
            try:
                await model.pool.acquire(share)
            except Displaced:
                self._count(model, "overloaded")
                raise self._overloaded(model, displaced=True) from None
            except BaseException:
                self._count(model, "cancelled")
                raise
            finally:
                model.waiting -= 1

    async def embed(self, request: EmbedRequest) -> EmbeddingResult:
        """Vectors for ``request``'s texts from its model (it must have the
        ``embed`` capability), sharing the model's slots fairly like answers.

        Raises:
            UnknownModel, MissingCapability, Overloaded, InvalidParams, or
            the backend's InferenceError.
        """
        started = trio.current_time()
        if request.model is None:  # the first model that embeds, else the default's error
            model = next((m for m in self.models.values()
                          if "embed" in m.backend.capabilities), self.resolve(None))
        else:
            model = self.resolve(request.model)
        if not self.running:
            raise BackendUnavailable("the inference engine is not running")
        if "embed" not in model.backend.capabilities:
            self._count(model, "error")
            raise missing_capability(model.name, "embed")
        await self._acquire(model, request.share)
        acquired = trio.current_time()
        outcome = "error"
        try:
            result = await model.backend.embed(list(request.texts))
            outcome = "success"
        except BaseException as exc:
            outcome = "error" if isinstance(exc, Exception) else "cancelled"
            raise
        finally:
            model.pool.release(request.share)
            self._count(model, outcome)
        ended = trio.current_time()
        model.prompt_tokens += result.prompt_tokens
        model.latency.update(ended - started)
        model.completed += 1
        model.latency_total += ended - started
        if self.metrics is not None:
            self.metrics.prompt_tokens.labels(model.name).inc(result.prompt_tokens)
            self.metrics.duration.labels(model.name).observe(ended - started)
        return EmbeddingResult(model=model.name, backend=model.backend.kind,
                               vectors=result.vectors, prompt_tokens=result.prompt_tokens,
                               latency=ended - started, queued=acquired - started)

    @staticmethod
    def _overloaded(model: ServedModel, *, displaced: bool = False) -> Overloaded:
        retry = model.retry_after()
        why = ("gave its place in the queue to another user's request" if displaced
               else f"{model.in_flight} running, {model.waiting} queued (max {model.max_queue})")
        return Overloaded(f"model {model.name} is busy: {why}; retry in {retry:.2f}s",
                          data={"retry_after": retry, "model": model.name,
                                "queue_depth": model.waiting})

    async def _replay(self, model: ServedModel, answer: CachedAnswer,
                      started: float) -> AsyncGenerator[TextChunk | Completion, None]:
        first: float | None = None
        if answer.text:
            first = trio.current_time()
            yield TextChunk(answer.text)
        self._count(model, "cached")
        yield Completion(
            model=model.name,
            backend=model.backend.kind,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            finish_reason=answer.finish_reason,
            usage_exact=answer.usage_exact,
            cached=True,
            ttft=None if first is None else first - started,
            latency=trio.current_time() - started,
            queued=0.0,
        )

    def _count(self, model: ServedModel, outcome: str) -> None:
        model.outcomes[outcome] += 1
        if self.metrics is not None:
            self.metrics.requests.labels(model.name, outcome).inc()

    def _count_cache(self, model: ServedModel, *, hit: bool) -> None:
        if hit:
            model.cache_hits += 1
        else:
            model.cache_misses += 1
        if self.metrics is not None:
            (self.metrics.cache_hits if hit else self.metrics.cache_misses).labels(
                model.name).inc()

    def _record(self, model: ServedModel, result: GenerationResult, started: float,
                first: float | None, ended: float) -> None:
        model.tokens_generated += result.completion_tokens
        model.prompt_tokens += result.prompt_tokens
        model.latency.update(ended - started)
        model.completed += 1
        model.latency_total += ended - started
        if first is not None:
            model.ttft.update(first - started)
            if result.completion_tokens >= 2 and ended > first:
                model.tok_s.update((result.completion_tokens - 1) / (ended - first))
        if self.metrics is not None:
            m = self.metrics
            m.tokens_generated.labels(model.name).inc(result.completion_tokens)
            m.prompt_tokens.labels(model.name).inc(result.prompt_tokens)
            m.duration.labels(model.name).observe(ended - started)
            if first is not None:
                m.ttft.labels(model.name).observe(first - started)

    async def resize(self, name: str, slots: int) -> int:
        """Set the slots of model ``name`` (a name or an alias); returns the
        new count. Requests holding a slot are never interrupted: growing
        asks the backend for the room first (e.g. loads llama.cpp
        instances), shrinking stops admitting first and lets the backend
        let go of instances only once they are free. Resizes of one model
        run one at a time.

        Raises:
            UnknownModel: no such model. ValueError: ``slots`` < 1.
            P2PInferError: the backend could not grow (the old count stays).
        """
        if slots < 1:
            raise ValueError("slots must be >= 1")
        model = self.resolve(name)
        async with model.resize_lock:
            old = model.slots
            if slots > old:
                await model.backend.resize(slots)
                model.pool.resize(slots)
            elif slots < old:
                model.pool.resize(slots)
                await model.backend.resize(slots)
            if slots != old:
                log.info("model %s: %d -> %d slot(s)", model.name, old, slots)
        return model.slots

    # -- reporting -----------------------------------------------------------------------
    def list_models(self) -> list[dict[str, Any]]:
        """Every model with backend, context length, status and aliases."""
        out = []
        for model in self.models.values():
            info = model.backend.info().to_dict()
            info.update(name=model.name, aliases=list(model.aliases),
                        status=model.backend.state.value,
                        default=model.name == self.default_model)
            out.append(info)
        return out

    def status(self, name: str | None) -> dict[str, Any]:
        """Health and figures of one model (``name`` may be an alias)."""
        model = self.resolve(name)
        out = model.load()
        out.update(
            model=model.name,
            error=model.backend.error,
            latency_ms=_round(model.latency.value, 1, scale=1000.0),
            requests=dict(model.outcomes),
            tokens_generated=model.tokens_generated,
            prompt_tokens=model.prompt_tokens,
            cache={"hits": model.cache_hits, "misses": model.cache_misses},
        )
        runtime = model.backend.runtime()
        if runtime is not None:
            out["runtime"] = runtime
        del out["name"]
        return out

    def describe(self) -> dict[str, Any]:
        """Models and load, small enough for a signed node descriptor."""
        models = [m.load() for m in self.models.values()]
        return {
            "models": models,
            "default_model": self.default_model,
            "free_slots": sum(m["free_slots"] for m in models),
            "in_flight": sum(m["in_flight"] for m in models),
            "queue_depth": sum(m["queue_depth"] for m in models),
        }

    def loaded(self) -> bool:
        """True when every model is loaded."""
        return all(m.backend.state is ModelState.LOADED for m in self.models.values())
