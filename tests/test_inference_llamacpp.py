"""The embedded llama.cpp backend on the real SmolLM2-135M-Instruct model.

Our own generation loop (worker thread, exact token counts, cancellation
between tokens) is checked against llama-cpp-python's create_chat_completion
on the same file: same text, same token counts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pinfer.errors import BackendUnavailable, InvalidParams
from p2pinfer.inference import (
    Completion,
    InferenceEngine,
    LlamaCppBackend,
    LlamaCppOptions,
    ResponseCache,
    TextChunk,
    embedded_model_path,
    parse_prompt_params,
)

STORY = "Write a short story about a robot."


@pytest.fixture(scope="module")
def reference_llm() -> Iterator[Any]:
    """llama-cpp-python used directly, as the reference."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(embedded_model_path()), n_ctx=2048, n_threads=1, seed=42,
                verbose=False)
    yield llm
    llm.close()


def reference(llm: Any, prompt: str, **kwargs: Any) -> tuple[str, dict[str, int], str]:
    out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], **kwargs)
    choice = out["choices"][0]
    return choice["message"]["content"], out["usage"], choice["finish_reason"]


@pytest.fixture
async def engine(nursery: trio.Nursery) -> AsyncIterator[InferenceEngine]:
    backend = LlamaCppBackend("smollm2", LlamaCppOptions(path=embedded_model_path(), slots=2))
    eng = InferenceEngine(cache=ResponseCache())
    eng.add_model(backend, aliases=["default"])
    await nursery.start(eng.run)
    with trio.fail_after(30):
        assert await eng.wait_settled() == {"smollm2": "loaded"}
    yield eng


async def ask(engine: InferenceEngine, params: Any) -> tuple[list[str], Completion]:
    chunks: list[str] = []
    done: Completion | None = None
    async with aclosing(engine.generate(parse_prompt_params(params))) as events:
        async for event in events:
            if isinstance(event, TextChunk):
                assert done is None, "a chunk after the result"
                chunks.append(event.text)
            else:
                done = event
    assert done is not None
    return chunks, done


async def test_answer_structure_and_exact_counts(engine: InferenceEngine,
                                                 reference_llm: Any) -> None:
    with trio.fail_after(60):
        chunks, done = await ask(engine, {"prompt": STORY, "max_tokens": 24, "temperature": 0})
    assert chunks and all(isinstance(c, str) and c for c in chunks)
    assert (done.model, done.backend, done.cached) == ("smollm2", "llamacpp", False)
    text, usage, finish = reference(reference_llm, STORY, max_tokens=24, temperature=0.0)
    assert "".join(chunks) == text
    assert done.prompt_tokens == usage["prompt_tokens"] > len(STORY.split())  # template
    assert done.completion_tokens == usage["completion_tokens"] == 24
    assert done.finish_reason == finish == "length"
    assert done.usage_exact and done.total_tokens == usage["total_tokens"]
    assert done.ttft is not None and 0 < done.ttft <= done.latency


async def test_end_of_answer_and_stop_sequences(engine: InferenceEngine,
                                                reference_llm: Any) -> None:
    with trio.fail_after(60):
        chunks, done = await ask(engine, {"prompt": "Say hi", "max_tokens": 200,
                                          "temperature": 0})
        text, usage, finish = reference(reference_llm, "Say hi", max_tokens=200,
                                        temperature=0.0)
        assert ("".join(chunks), done.completion_tokens, done.finish_reason) == (
            text, usage["completion_tokens"], finish)
        assert done.finish_reason == "stop" and done.completion_tokens < 200

        chunks, done = await ask(engine, {"prompt": STORY, "max_tokens": 24, "temperature": 0,
                                          "stop": [","]})
        text, usage, finish = reference(reference_llm, STORY, max_tokens=24, temperature=0.0,
                                        stop=[","])
    assert "".join(chunks) == text and "," not in text and text
    assert done.finish_reason == finish == "stop"
    assert done.completion_tokens == usage["completion_tokens"] < 24


async def test_identical_output_at_temperature_0_across_calls_and_slots(
        engine: InferenceEngine) -> None:
    results: list[str] = []

    async def one() -> None:
        chunks, done = await ask(engine, {"prompt": "Name three colors.", "max_tokens": 16,
                                          "temperature": 0, "cache": False})
        assert not done.cached
        results.append("".join(chunks))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(3):  # two slots: two instances serve them
                nursery.start_soon(one)
    assert len(results) == 3 and len(set(results)) == 1 and results[0]
    assert engine.status("smollm2")["requests"]["success"] == 3


async def test_seed_makes_sampling_repeatable(engine: InferenceEngine) -> None:
    def params(seed: int) -> dict[str, Any]:
        return {"prompt": STORY, "max_tokens": 20, "temperature": 1.0, "seed": seed,
                "cache": False}

    with trio.fail_after(60):
        a, _ = await ask(engine, params(123))
        b, _ = await ask(engine, params(123))
        others = [await ask(engine, params(seed)) for seed in (1, 2)]
    assert a == b
    assert any(chunks != a for chunks, _ in others)


async def test_generation_does_not_block_the_trio_loop(engine: InferenceEngine) -> None:
    gaps: list[float] = []
    stop = trio.Event()

    async def ticker() -> None:
        last = trio.current_time()
        while not stop.is_set():
            await trio.sleep(0.005)
            now = trio.current_time()
            gaps.append(now - last)
            last = now

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            _, done = await ask(engine, {"prompt": STORY, "max_tokens": 48, "cache": False})
            stop.set()
    assert done.completion_tokens > 0
    assert len(gaps) > 20
    # The loop kept ticking while prefill and decode ran in worker threads.
    assert max(gaps) < 0.15, max(gaps)


async def test_cancel_frees_the_slot_within_a_token(engine: InferenceEngine) -> None:
    backend: Any = engine.models["smollm2"].backend
    with trio.fail_after(60):
        # While decoding.
        request = parse_prompt_params({"prompt": "Write a very long story.", "max_tokens": 2000,
                                       "cache": False})
        got = 0
        async with aclosing(engine.generate(request)) as events:
            async for _ in events:
                got += 1
                if got == 5:
                    break
            started = trio.current_time()
        assert trio.current_time() - started < 0.5
        assert engine.models["smollm2"].free_slots == 2 and not backend._jobs

        # While evaluating a long prompt (~1,500 tokens: several seconds of prefill).
        long_prompt = {"prompt": "hello world " * 700, "max_tokens": 5, "cache": False}
        started = trio.current_time()
        with trio.move_on_after(0.3) as scope:
            await ask(engine, long_prompt)
        assert scope.cancelled_caught
        # Cancelled mid-prefill: the thread stopped at the next prompt chunk,
        # and the slot was free again before the cancellation completed.
        assert trio.current_time() - started < 0.3 + 0.4
        assert engine.models["smollm2"].free_slots == 2 and not backend._jobs
        status = engine.status("smollm2")
        assert status["requests"]["cancelled"] == 2 and status["in_flight"] == 0
        # And the model still answers.
        _, done = await ask(engine, {"prompt": "Say hi", "max_tokens": 4, "cache": False})
    assert done.completion_tokens == 4


async def test_a_slow_consumer_gets_waiting_tokens_in_one_chunk(
        engine: InferenceEngine, reference_llm: Any) -> None:
    request = parse_prompt_params({"prompt": STORY, "max_tokens": 24, "temperature": 0,
                                   "cache": False})
    chunks: list[str] = []
    with trio.fail_after(60):
        async with aclosing(engine.generate(request)) as events:
            async for event in events:
                if isinstance(event, TextChunk):
                    chunks.append(event.text)
                    if len(chunks) == 1:
                        await trio.sleep(0.2)  # ~15 tokens are generated meanwhile
    text, _, _ = reference(reference_llm, STORY, max_tokens=24, temperature=0.0)
    assert "".join(chunks) == text
    assert len(chunks) < 24 - 5


async def test_prompt_longer_than_the_context_is_invalid(engine: InferenceEngine) -> None:
    with trio.fail_after(30), pytest.raises(InvalidParams) as ei:
        await ask(engine, {"prompt": "lorem ipsum dolor " * 1500, "max_tokens": 5})
    assert ei.value.data["field"] == "messages" and "context of 2048" in ei.value.message
    assert engine.models["smollm2"].free_slots == 2


async def test_a_file_that_fails_to_load_is_an_error_state(tmp_path: Path,
                                                           nursery: trio.Nursery) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really" * 10)
    eng = InferenceEngine()
    eng.add_model(LlamaCppBackend("broken", LlamaCppOptions(path=bad, slots=1)))
    await nursery.start(eng.run)
    with trio.fail_after(30):
        assert await eng.wait_settled() == {"broken": "error"}
        with pytest.raises(BackendUnavailable, match="failed to load"):
            await ask(eng, "hello")
    status = eng.status("broken")
    assert status["status"] == "error" and "broken.gguf" in status["error"]
    assert status["free_slots"] == 1
