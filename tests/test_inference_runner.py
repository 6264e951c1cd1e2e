"""Supervising the llama-server runner: real processes, real signals, the real
embedded model.

A runner killed mid-stream (SIGSEGV, as a native crash; SIGKILL, as the OOM
killer) ends that stream with ModelUnavailable, answers every request
meanwhile at once with ModelUnavailable and a retry_after, and serves again
within 10 s; the forced fallback (no weight repacking) runs on every CPU; a
runner that crashes while starting is started again without repacking; a
resize rolls over to a new runner without cutting a stream; a node killed
with SIGKILL leaves no runner behind; the runner's output goes to the log.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from p2pinfer.errors import ModelUnavailable
from p2pinfer.inference import (
    Completion,
    InferenceEngine,
    LlamaCppBackend,
    LlamaCppOptions,
    TextChunk,
    embedded_model_path,
    parse_prompt_params,
)
from p2pinfer.inference.runner import cpu_features, find_llama_server, repack_decision

from .helpers import wait_for
from .test_daemon import start_daemon, wait_ready
from .test_inference_llamacpp import ask as ask_chunks


async def started(nursery: trio.Nursery, **options: Any) -> tuple[InferenceEngine, Any]:
    options.setdefault("slots", 2)
    backend = LlamaCppBackend("smollm2", LlamaCppOptions(path=embedded_model_path(), **options))
    engine = InferenceEngine()
    engine.add_model(backend)
    await nursery.start(engine.run)
    with trio.fail_after(60):
        assert await engine.wait_settled() == {"smollm2": "loaded"}
    return engine, backend


@pytest.fixture
async def served(nursery: trio.Nursery) -> AsyncIterator[tuple[InferenceEngine, Any]]:
    yield await started(nursery)


async def ask(engine: InferenceEngine, params: Any) -> tuple[str, Completion]:
    chunks, done = await ask_chunks(engine, params)
    return "".join(chunks), done


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL], ids=["SIGSEGV", "SIGKILL"])
async def test_a_runner_killed_mid_stream_is_back_within_10_s(
        served: tuple[InferenceEngine, Any], sig: signal.Signals) -> None:
    engine, backend = served
    old_pid = backend._session.process.pid
    repack_before = backend._session.repack
    with trio.fail_after(60):
        got = 0
        with pytest.raises(ModelUnavailable) as ei:
            async with aclosing(engine.generate(parse_prompt_params(
                    {"prompt": "Write a long story.", "max_tokens": 1000,
                     "cache": False}))) as events:
                async for event in events:
                    if isinstance(event, TextChunk):
                        got += 1
                        if got == 3:
                            backend._session.process.signal(sig)
                            killed = trio.current_time()
        assert ei.value.retry_after is not None and ei.value.retry_after > 0
        assert sig.name in ei.value.message

        # Meanwhile: an immediate, clear refusal with a retry_after, never a hang.
        refusals = 0
        while True:
            asked = trio.current_time()
            try:
                text, done = await ask(engine, {"prompt": "Say hi", "max_tokens": 4,
                                                "cache": False})
                break
            except ModelUnavailable as exc:
                refusals += 1
                assert trio.current_time() - asked < 1.0
                assert exc.data["retry_after"] > 0 and exc.data["model"] == "smollm2"
                await trio.sleep(0.05)
        back = trio.current_time() - killed
    assert back < 10.0, back
    assert done.completion_tokens == 4 and text
    runtime = engine.status("smollm2")["runtime"]
    assert runtime["restarts"] == 1 and runtime["state"] == "running"
    assert runtime["last_exits"][-1]["exit"] == sig.name
    assert runtime["pid"] != old_pid and not pid_alive(old_pid)
    if sig is signal.SIGSEGV and repack_before:
        # A crash in native code with repacking on: the next runner runs without.
        assert runtime["repack"] is False and "SIGSEGV" in runtime["repack_reason"]
    if sig is signal.SIGKILL:  # killed from outside: no reason to change the variant
        assert runtime["repack"] is repack_before
    status = engine.status("smollm2")
    assert status["in_flight"] == 0 and status["free_slots"] == 2
    assert status["requests"]["error"] == 1 + refusals


async def test_the_forced_fallback_runs_without_repacking(nursery: trio.Nursery) -> None:
    """``repack = "off"``: the path an AMX CPU takes, on whatever CPU this is."""
    engine, backend = await started(nursery, repack="off", slots=1, gpu_layers=0)
    runtime = engine.status("smollm2")["runtime"]
    assert runtime["repack"] is False and "configuration" in runtime["repack_reason"]
    cmdline = psutil.Process(runtime["pid"]).cmdline()
    assert "--no-repack" in cmdline
    # gpu_layers reaches the runner; on a machine without a GPU nothing is offloaded.
    assert cmdline[cmdline.index("-ngl") + 1] == "0"
    assert runtime["gpu_layers"] is None and list(runtime["devices"]) == ["CPU"]
    assert runtime["variant"].endswith("repack off") and not runtime["repacked_buffers_mib"]
    with trio.fail_after(60):
        text, done = await ask(engine, {"prompt": "Name three colors.", "max_tokens": 16,
                                        "temperature": 0})
    assert text and done.usage_exact and done.completion_tokens <= 16


def test_the_fallback_is_one_setting_or_variable_away(tmp_path: Path) -> None:
    from p2pinfer.config import NodeConfig
    from p2pinfer.errors import ConfigError
    from p2pinfer.inference.settings import InferenceSettings, build_models

    config = NodeConfig.from_mapping({"node": {"home": str(tmp_path)}},
                                     env={"P2PINFER_REPACK": "off"})
    settings = InferenceSettings.from_config(config)
    assert settings.repack == "off"
    entry = build_models(config.tree, settings)[0]  # SmolLM2 (then the embedding model)
    assert entry.backend.runtime()["repack"] is False
    with pytest.raises(ConfigError, match="inference.repack: must be one of auto, on, off"):
        InferenceSettings.from_config(NodeConfig.from_mapping(
            {"node": {"home": str(tmp_path)}, "inference": {"repack": "maybe"}}, env={}))
    with pytest.raises(ConfigError, match="inference.llama_server: not an executable file"):
        InferenceSettings.from_config(NodeConfig.from_mapping(
            {"node": {"home": str(tmp_path)}, "inference": {"llama_server": str(tmp_path)}},
            env={}))
    with pytest.raises(ConfigError, match="models\\[0\\].gpu_layers"):
        build_models({"models": [{"name": "m", "gpu_layers": "all"}]}, settings)


def test_amx_cpus_start_without_repacking() -> None:
    on, why = repack_decision("auto", frozenset({"avx2", "avx512f", "amx_int8", "amx_tile"}))
    assert on is False and "AMX" in why and "amx_int8" in why
    assert repack_decision("auto", frozenset({"avx2", "avx512f"}))[0] is True
    assert repack_decision("on", frozenset({"amx_int8"}))[0] is True
    assert repack_decision("off", frozenset({"avx2"}))[0] is False
    # This machine's own flags are read (x86-64 always has sse2).
    features = cpu_features()
    assert not features or "sse2" in features or "fp" in features


async def test_a_runner_that_crashes_while_starting_is_restarted_without_repacking(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """A llama-server that dies of SIGSEGV unless it runs with ``--no-repack``
    (what the AMX kernels did on their first multi-token batch)."""
    real = find_llama_server()
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\n"
                    "case \" $* \" in *\" --no-repack \"*) exec " + str(real) + " \"$@\";; esac\n"
                    "kill -SEGV $$\n")
    fake.chmod(0o755)
    engine, backend = await started(nursery, llama_server=fake, repack="auto", slots=1)
    runtime = engine.status("smollm2")["runtime"]
    if not repack_decision("auto", cpu_features())[0]:
        pytest.skip("this CPU starts without repacking anyway")
    assert runtime["repack"] is False
    assert "SIGSEGV while starting" in runtime["repack_reason"]
    with trio.fail_after(60):
        text, done = await ask(engine, {"prompt": "Say hi", "max_tokens": 4})
    assert done.completion_tokens == 4 and text


async def test_resize_rolls_over_without_cutting_a_stream(nursery: trio.Nursery) -> None:
    engine, backend = await started(nursery, slots=1)
    first_pid = backend._session.process.pid
    with trio.fail_after(120):
        result: dict[str, Any] = {}

        async def long_answer() -> None:
            result["text"], result["done"] = await ask(engine, {
                "prompt": "Write a long story.", "max_tokens": 150, "temperature": 0,
                "cache": False})

        async with trio.open_nursery() as n:
            n.start_soon(long_answer)
            await trio.sleep(0.3)
            assert await engine.resize("smollm2", 2) == 2
            # The new runner serves new requests while the old one finishes.
            new_pid = backend._session.process.pid
            assert new_pid != first_pid and pid_alive(first_pid)
            text, done = await ask(engine, {"prompt": "Say hi", "max_tokens": 4,
                                            "cache": False})
            assert done.completion_tokens == 4
        assert result["done"].completion_tokens == 150 and result["done"].finish_reason == "length"
        # Once its last stream ended, the old runner stopped.
        for _ in range(100):
            if not pid_alive(first_pid):
                break
            await trio.sleep(0.05)
    assert not pid_alive(first_pid)
    runtime = engine.status("smollm2")["runtime"]
    assert runtime["slots"] == 2 and runtime["restarts"] == 0
    assert psutil.Process(new_pid).cmdline()[psutil.Process(new_pid).cmdline().index("-np") + 1] \
        == "2"


async def test_the_runners_output_goes_to_the_log_not_the_terminal(
        nursery: trio.Nursery, capfd: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="p2pinfer.inference.runner")
    engine, backend = await started(nursery, slots=1)
    with trio.fail_after(60):
        await ask(engine, {"prompt": "Say hi", "max_tokens": 4})
    out, err = capfd.readouterr()
    assert "llama_server" not in out + err and "load_tensors" not in out + err
    logged = [r.getMessage() for r in caplog.records
              if r.name.startswith("p2pinfer.inference.runner")]
    assert any("listening on http://127.0.0.1:" in m for m in logged)
    assert any("system_info" in m for m in logged)
    assert not any("Say hi" in m for m in logged)  # prompts never reach the log


def test_a_node_killed_with_sigkill_leaves_no_runner(tmp_path: Path) -> None:
    (tmp_path / "node.toml").write_text('[inference]\nslots = 1\nn_threads = 1\n')
    proc, ready = start_daemon(tmp_path, "--roles", "inference", "--config",
                               str(tmp_path / "node.toml"))
    try:
        wait_ready(proc, ready, limit=60)
        deadline = time.monotonic() + 60
        runners: list[psutil.Process] = []
        while not runners and time.monotonic() < deadline:
            runners = [p for p in psutil.Process(proc.pid).children()
                       if p.name() == "llama-server"]
            time.sleep(0.1)
        assert runners, (tmp_path / "stderr.log").read_text()[-3000:]
        runner = runners[0]
        # In a process group of its own: a Ctrl-C on the terminal reaches the node only.
        assert os.getpgid(runner.pid) != os.getpgid(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        gone_by = time.monotonic() + 5
        while runner.is_running() and runner.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < gone_by, "the runner outlived its node by 5 s"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_runner_lines_are_not_on_the_daemons_stdout(tmp_path: Path) -> None:
    """The daemon as an operator runs it: stdout stays clean, the log
    (stderr) has our lines, and llama-server's own lines only through it."""
    (tmp_path / "node.toml").write_text('[inference]\nslots = 1\nn_threads = 1\n')
    ready = tmp_path / "ready.json"
    env = {**os.environ, "P2PINFER_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pinfer.daemon", "--ready-file", str(ready), "--listen",
         "/ip4/127.0.0.1/tcp/0", "--roles", "inference", "--config",
         str(tmp_path / "node.toml")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists()
        json.loads(ready.read_text())
        while time.monotonic() < deadline:
            if any(p.name() == "llama-server" for p in psutil.Process(proc.pid).children()):
                break
            time.sleep(0.1)
        time.sleep(1.0)  # the runner has printed its start-up lines by now
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err[-2000:]
    assert out == ""
    for line in err.splitlines():  # every line is one of the node's log records
        assert not line.startswith(("0.0", "srv ", "slot ", "llama_", "load_tensors")), line


async def test_through_a_gateway_a_dead_runner_fails_over_or_interrupts(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """Two workers on the real model. A whole answer whose runner dies half
    way is served by the other worker; a stream whose runner dies after its
    first tokens ends with StreamInterrupted; each request is charged once."""
    from p2pinfer import errors
    from p2pinfer.client import Client

    from .helpers import make_network
    from .test_gateway import gateways_see_workers, new_user_with_key, start

    roles = [["auth", "gateway"], ["inference"], ["inference"]]
    homes = make_network(tmp_path, ["gw", "w1", "w2"], roles=roles)
    worker_tables = {"inference": {"slots": 1, "n_threads": 1, "cache": False}}
    gw, w1, w2 = nodes = await start(nursery, homes, roles,
                                     per_node_tables=[{}, worker_tables, worker_tables])
    workers = {w1.peer_id: w1, w2.peer_id: w2}

    def busy_backend() -> Any:
        for w in (w1, w2):
            model = w.roles["inference"].engine.models["smollm2"]
            if model.in_flight and model.backend._session is not None:
                return model.backend
        return None

    async def kill_busy_runner() -> str:
        backend = await wait_for(busy_backend, limit=60, interval=0.01)
        await trio.sleep(0.3)  # tokens are being generated
        backend._session.process.signal(signal.SIGSEGV)
        return next(p for p, w in workers.items()
                    if w.roles["inference"].engine.models["smollm2"].backend is backend)

    try:
        with trio.fail_after(180):
            creds = await new_user_with_key(gw)
            await gateways_see_workers(nodes, "smollm2", 2)
            async with Client(bootstrap=[gw.addrs[0]], api_key=creds["api_key"]) as client:
                # A whole answer: nothing reached the client, so another worker answers.
                async with trio.open_nursery() as n:
                    killed: list[str] = []

                    async def kill() -> None:
                        killed.append(await kill_busy_runner())
                    n.start_soon(kill)
                    whole = await client.inference("Write a long story.", model="smollm2",
                                                   max_tokens=120, temperature=0)
                assert whole.worker != killed[0] and whole.usage["completion_tokens"] == 120

                # Wait until the killed runner is back, then stream and kill again.
                await _until_serving(workers[killed[0]])
                parts: list[str] = []
                nursery.start_soon(kill_busy_runner)
                with pytest.raises(errors.StreamInterrupted) as ei:
                    async with client.stream("Write a long story.", model="smollm2",
                                             max_tokens=400, temperature=0) as stream:
                        async for part in stream:
                            parts.append(part)
                assert parts and ei.value.data["cause"] == ModelUnavailable.code
                quota = await client.quota()
            # Each request charged once: two requests, the whole answer's tokens
            # exactly, the interrupted one's as far as it got.
            assert quota["usage"]["requests"] == 2
            assert quota["usage"]["tokens"] >= whole.usage["total_tokens"] + 1
            assert gw.roles["gateway"].quota.book.held() == 0
    finally:
        for node in nodes:
            node.stop()


async def _until_serving(node: Any) -> None:
    backend = node.roles["inference"].engine.models["smollm2"].backend
    await wait_for(lambda: backend._session is not None, limit=30)
