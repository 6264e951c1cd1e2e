"""The embedded llama.cpp backend on the real SmolLM2-135M-Instruct model,
served by a real llama-server runner process.

What the engine streams is checked against the same runner asked directly
(a plain, non-streamed ``/v1/chat/completions``): same text, same token
counts, same finish reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx2
import psutil
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

from .helpers import wait_for

STORY = "Write a short story about a robot."


@pytest.fixture
async def engine(nursery: trio.Nursery) -> AsyncIterator[InferenceEngine]:
    backend = LlamaCppBackend("smollm2", LlamaCppOptions(path=embedded_model_path(), slots=2))
    eng = InferenceEngine(cache=ResponseCache())
    eng.add_model(backend, aliases=["default"])
    await nursery.start(eng.run)
    with trio.fail_after(60):
        assert await eng.wait_settled() == {"smollm2": "loaded"}
    yield eng


def runner_of(engine: InferenceEngine) -> Any:
    session = engine.models["smollm2"].backend._session  # type: ignore[attr-defined]
    assert session is not None
    return session.process


async def direct(engine: InferenceEngine, prompt: str, **params: Any
                 ) -> tuple[str, dict[str, int], str]:
    """The same runner, asked directly and without streaming: the reference."""
    runner = runner_of(engine)
    async with httpx2.AsyncClient(headers=runner.headers(), timeout=60) as client:
        r = await client.post(f"{runner.url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": prompt}], **params})
    r.raise_for_status()
    body = r.json()
    choice = body["choices"][0]
    return choice["message"]["content"], body["usage"], choice["finish_reason"]


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


async def slots_busy(engine: InferenceEngine) -> int:
    """Sequences the runner itself is working on (its /slots endpoint)."""
    runner = runner_of(engine)
    async with httpx2.AsyncClient(headers=runner.headers(), timeout=10) as client:
        slots = (await client.get(f"{runner.url}/slots")).json()
    return sum(1 for s in slots if s["is_processing"])


async def _idle(engine: InferenceEngine) -> bool:
    return await slots_busy(engine) == 0


async def test_answer_structure_and_exact_counts(engine: InferenceEngine) -> None:
    with trio.fail_after(60):
        chunks, done = await ask(engine, {"prompt": STORY, "max_tokens": 24, "temperature": 0})
        text, usage, finish = await direct(engine, STORY, max_tokens=24, temperature=0)
    assert chunks and all(isinstance(c, str) and c for c in chunks)
    assert (done.model, done.backend, done.cached) == ("smollm2", "llamacpp", False)
    assert "".join(chunks) == text
    assert done.prompt_tokens == usage["prompt_tokens"] > len(STORY.split())  # template
    assert done.completion_tokens == usage["completion_tokens"] == 24
    assert done.finish_reason == finish == "length"
    assert done.usage_exact and done.total_tokens == usage["total_tokens"]
    assert done.ttft is not None and 0 < done.ttft <= done.latency


async def test_end_of_answer_and_stop_sequences(engine: InferenceEngine) -> None:
    with trio.fail_after(60):
        chunks, done = await ask(engine, {"prompt": "Say hi", "max_tokens": 200,
                                          "temperature": 0})
        text, usage, finish = await direct(engine, "Say hi", max_tokens=200, temperature=0)
        assert ("".join(chunks), done.completion_tokens, done.finish_reason) == (
            text, usage["completion_tokens"], finish)
        assert done.finish_reason == "stop" and done.completion_tokens < 200

        chunks, done = await ask(engine, {"prompt": STORY, "max_tokens": 24, "temperature": 0,
                                          "stop": [","]})
        text, usage, finish = await direct(engine, STORY, max_tokens=24, temperature=0,
                                           stop=[","])
    assert "".join(chunks) == text and "," not in text and text
    assert done.finish_reason == finish == "stop"
    assert done.completion_tokens == usage["completion_tokens"] < 24


async def test_two_concurrent_generations_give_the_text_each_gives_alone(
        engine: InferenceEngine) -> None:
    """Continuous batching: two sequences decoded together in one runner give
    the same temperature-0 text as each decoded alone."""
    prompts = ["Write a short story about a robot.", "Explain how a bicycle works."]

    def params(prompt: str) -> dict[str, Any]:
        return {"prompt": prompt, "max_tokens": 64, "temperature": 0, "cache": False}

    with trio.fail_after(120):
        alone = ["".join((await ask(engine, params(p)))[0]) for p in prompts]
        together: dict[int, str] = {}
        busy: list[int] = []

        async def one(i: int) -> None:
            together[i] = "".join((await ask(engine, params(prompts[i])))[0])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, 0)
            nursery.start_soon(one, 1)
            await trio.sleep(0.3)
            busy.append(await slots_busy(engine))
    assert busy == [2]  # both sequences were in the runner at once
    assert together == dict(enumerate(alone)) and all(alone)
    assert engine.status("smollm2")["requests"]["success"] == 4


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
            for _ in range(3):  # two slots: the third waits for one
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
    assert "".join(a) == "".join(b)
    assert any("".join(chunks) != "".join(a) for chunks, _ in others)


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
    # The loop kept ticking while the runner worked in its own process.
    assert max(gaps) < 0.15, max(gaps)


async def test_cancel_frees_the_sequence_within_a_token(engine: InferenceEngine) -> None:
    backend: Any = engine.models["smollm2"].backend
    with trio.fail_after(60):
        # While decoding.
        request = parse_prompt_params({"prompt": "Write a very long story.", "max_tokens": 2000,
                                       "temperature": 0, "cache": False})
        got = 0
        async with aclosing(engine.generate(request)) as events:
            async for _ in events:
                got += 1
                if got == 5:
                    break
            started = trio.current_time()
        assert trio.current_time() - started < 0.5
        assert engine.models["smollm2"].free_slots == 2
        assert backend._session.active == 0
        # The runner has dropped the sequence too (a token at ~10 ms here;
        # the margin is for a loaded machine).
        await trio.sleep(0.25)
        assert await slots_busy(engine) == 0

        # While evaluating a long prompt (~1,200 tokens).
        long_prompt = {"prompt": "hello world " * 600, "max_tokens": 5, "cache": False}
        started = trio.current_time()
        with trio.move_on_after(0.2) as scope:
            await ask(engine, long_prompt)
        assert scope.cancelled_caught
        assert trio.current_time() - started < 0.2 + 0.4
        assert engine.models["smollm2"].free_slots == 2 and backend._session.active == 0
        status = engine.status("smollm2")
        assert status["requests"]["cancelled"] == 2 and status["in_flight"] == 0
        # And the model still answers.
        _, done = await ask(engine, {"prompt": "Say hi", "max_tokens": 4, "cache": False})
    assert done.completion_tokens == 4


async def test_a_slow_consumer_gets_waiting_tokens_in_one_chunk(
        engine: InferenceEngine) -> None:
    request = parse_prompt_params({"prompt": STORY, "max_tokens": 24, "temperature": 0,
                                   "cache": False})
    chunks: list[str] = []
    with trio.fail_after(60):
        async with aclosing(engine.generate(request)) as events:
            async for event in events:
                if isinstance(event, TextChunk):
                    chunks.append(event.text)
                    if len(chunks) == 1:
                        # The rest of the answer is generated meanwhile.
                        await trio.sleep(0.1)
                        await wait_for(lambda: _idle(engine), limit=20)
        text, _, _ = await direct(engine, STORY, max_tokens=24, temperature=0)
    assert "".join(chunks) == text
    assert len(chunks) <= 3  # the first token, then (nearly) all the rest at once


async def test_prompt_longer_than_the_context_is_invalid(engine: InferenceEngine) -> None:
    with trio.fail_after(30), pytest.raises(InvalidParams) as ei:
        await ask(engine, {"prompt": "lorem ipsum dolor " * 1500, "max_tokens": 5})
    assert ei.value.data["field"] == "messages" and "context of 2048" in ei.value.message
    assert engine.models["smollm2"].free_slots == 2
    with trio.fail_after(30):  # and the runner serves on
        _, done = await ask(engine, {"prompt": "Say hi", "max_tokens": 3, "cache": False})
    assert done.completion_tokens == 3


async def test_status_says_what_runs(engine: InferenceEngine) -> None:
    status = engine.status("smollm2")
    runtime = status["runtime"]
    assert runtime["engine"] == "llama-server" and runtime["state"] == "running"
    assert runtime["pid"] == runner_of(engine).pid
    assert psutil.Process(runtime["pid"]).name() == "llama-server"
    assert runtime["slots"] == 2 and runtime["kv_cache"]["n_ctx_per_slot"] == 2048
    assert runtime["kv_cache"]["mib_per_slot"] > 0
    assert runtime["cpu_features"] and runtime["repack_reason"]
    assert runtime["devices"].get("CPU") and runtime["gpu_layers"] is None
    assert status["runner"] == runtime["variant"]
    assert status["runner"].startswith("llama-server, ")
    assert engine.describe()["models"][0]["runner"] == status["runner"]


async def test_the_runner_listens_on_loopback_and_wants_its_key(
        engine: InferenceEngine) -> None:
    runner = runner_of(engine)
    listening = [c.laddr for c in psutil.Process(runner.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening)
    async with httpx2.AsyncClient(timeout=10) as client:
        r = await client.post(f"{runner.url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 401
        r = await client.post(f"{runner.url}/v1/chat/completions", headers={
            "Authorization": "Bearer wrong"}, json={"messages": [], "max_tokens": 2})
        assert r.status_code == 401
    # The key is in the runner's environment, never on its command line.
    assert runner.api_key not in " ".join(psutil.Process(runner.pid).cmdline())


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
