"""The engine's own logic on the synthetic backend (instant): routing, the
cache rules, queue order, outcomes, and metrics on an injected registry."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import pytest
import trio
from prometheus_client import REGISTRY, CollectorRegistry

from p2pinfer.errors import BackendError, BackendUnavailable, UnknownModel
from p2pinfer.inference import (
    Completion,
    GenerationRequest,
    InferenceEngine,
    InferenceMetrics,
    ResponseCache,
    SyntheticBackend,
    TextChunk,
    parse_prompt_params,
)
from p2pinfer.inference.backend import StreamEvent


async def ask(engine: InferenceEngine, params: Any) -> tuple[str, Completion]:
    text = ""
    done: Completion | None = None
    async with aclosing(engine.generate(parse_prompt_params(params))) as events:
        async for event in events:
            if isinstance(event, TextChunk):
                text += event.text
            else:
                done = event
    assert done is not None
    return text, done


class FlakyBackend(SyntheticBackend):
    """Synthetic, but the first ``failures`` generations fail after one chunk."""

    def __init__(self, name: str, failures: int, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.failures = failures
        self.calls = 0

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        self.calls += 1
        if self.calls <= self.failures:
            yield TextChunk("partial ")
            raise BackendError("the backend fell over")
        async for event in super().generate(request):
            yield event


@pytest.fixture
async def engine(nursery: trio.Nursery) -> InferenceEngine:
    eng = InferenceEngine(cache=ResponseCache(), metrics=InferenceMetrics(CollectorRegistry()))
    eng.add_model(SyntheticBackend("fake", tokens=5), aliases=["f", "default"])
    eng.add_model(FlakyBackend("flaky", failures=1, tokens=3))
    eng.add_model(SyntheticBackend("slow", tokens=4, token_delay=0.05, slots=1), max_queue=10)
    await nursery.start(eng.run)
    return eng


async def test_not_running_is_unavailable() -> None:
    eng = InferenceEngine()
    eng.add_model(SyntheticBackend("fake"))
    with trio.fail_after(5), pytest.raises(BackendUnavailable, match="not running"):
        await ask(eng, "hi")


async def test_routing_by_name_alias_and_default(engine: InferenceEngine) -> None:
    with trio.fail_after(5):
        for name in (None, "fake", "f", "default"):
            _, done = await ask(engine, {"prompt": "hi", "model": name} if name else "hi")
            assert done.model == "fake" and done.backend == "synthetic"
        with pytest.raises(UnknownModel) as ei:
            await ask(engine, {"prompt": "hi", "model": "gpt-9"})
    assert "default, f, fake, flaky, slow" in ei.value.message
    assert engine.names() == ["fake", "f", "default", "flaky", "slow"]


async def test_synthetic_counts_are_exact_and_deterministic(engine: InferenceEngine) -> None:
    with trio.fail_after(5):
        a, done = await ask(engine, {"messages": [{"role": "system", "content": "be brief"},
                                                  {"role": "user", "content": "one two three"}],
                                     "cache": False})
        b, _ = await ask(engine, {"messages": [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "one two three"}],
                                  "cache": False})
        cut, cut_done = await ask(engine, {"prompt": "x", "max_tokens": 2})
    assert a == b and len(a.split()) == 5
    assert (done.prompt_tokens, done.completion_tokens, done.finish_reason) == (
        2 + 3 + 3 + 3, 5, "stop")
    assert cut_done.completion_tokens == 2 and cut_done.finish_reason == "length"


async def test_cache_rules(engine: InferenceEngine) -> None:
    cache = engine.cache
    assert cache is not None
    with trio.fail_after(5):
        # temperature > 0 without a seed: never cached
        for _ in range(2):
            _, done = await ask(engine, {"prompt": "hi", "temperature": 0.7})
            assert not done.cached
        assert (cache.hits, cache.misses) == (0, 0)
        # temperature 0, then a fixed seed: cached, replayed identically
        for params in ({"prompt": "hi", "temperature": 0},
                       {"prompt": "hi", "temperature": 1.2, "seed": 9}):
            first, done1 = await ask(engine, params)
            second, done2 = await ask(engine, params)
            assert first == second and not done1.cached and done2.cached
            assert done2.completion_tokens == done1.completion_tokens
        # a different parameter is a different entry; cache: false bypasses it
        _, done = await ask(engine, {"prompt": "hi", "temperature": 0, "max_tokens": 4})
        assert not done.cached
        _, done = await ask(engine, {"prompt": "hi", "temperature": 0, "cache": False})
        assert not done.cached
        # errors are never cached: the retry generates and is then cached
        with pytest.raises(BackendError):
            await ask(engine, {"prompt": "hi", "temperature": 0, "model": "flaky"})
        text, done = await ask(engine, {"prompt": "hi", "temperature": 0, "model": "flaky"})
        assert "partial" not in text and not done.cached
        _, done = await ask(engine, {"prompt": "hi", "temperature": 0, "model": "flaky"})
        assert done.cached
    assert engine.status("fake")["cache"] == {"hits": 2, "misses": 3}
    assert engine.status("flaky")["cache"] == {"hits": 1, "misses": 2}
    assert engine.status("flaky")["requests"]["error"] == 1


async def test_a_cancelled_answer_is_not_cached(engine: InferenceEngine) -> None:
    params = {"prompt": "hi", "temperature": 0, "model": "slow"}
    with trio.fail_after(5):
        async with aclosing(engine.generate(parse_prompt_params(params))) as events:
            async for _ in events:
                break
        _, done = await ask(engine, params)
    assert not done.cached
    assert engine.status("slow")["requests"]["cancelled"] == 1


async def test_waiting_requests_are_served_in_arrival_order(engine: InferenceEngine) -> None:
    order: list[int] = []

    async def one(i: int) -> None:
        await ask(engine, {"prompt": f"request {i}", "model": "slow", "cache": False})
        order.append(i)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(one, i)
                await trio.sleep(0.01)
            model = engine.models["slow"]
            assert model.in_flight == 1 and model.waiting == 4
            first_hint = model.retry_after()
    assert order == [0, 1, 2, 3, 4]
    assert first_hint > engine.models["slow"].retry_after()  # shorter queue, shorter wait


async def test_metrics_go_to_the_injected_registry(engine: InferenceEngine) -> None:
    assert engine.metrics is not None
    registry = engine.metrics.registry
    with trio.fail_after(5):
        await ask(engine, {"prompt": "a b", "temperature": 0})
        await ask(engine, {"prompt": "a b", "temperature": 0})
    value = registry.get_sample_value
    assert value("ai_platform_inference_tokens_generated_total", {"model": "fake"}) == 5
    assert value("ai_platform_inference_prompt_tokens_total", {"model": "fake"}) == 5
    assert value("ai_platform_inference_requests_total",
                 {"model": "fake", "status": "success"}) == 1
    assert value("ai_platform_inference_requests_total",
                 {"model": "fake", "status": "cached"}) == 1
    assert value("ai_platform_inference_cache_hits_total", {"model": "fake"}) == 1
    assert value("ai_platform_inference_duration_seconds_count", {"model": "fake"}) == 1
    assert value("ai_platform_inference_free_slots", {"model": "slow"}) == 1
    assert REGISTRY.get_sample_value("ai_platform_inference_tokens_generated_total",
                                     {"model": "fake"}) is None

