"""The small interface every model backend implements, and what flows through it.

A backend serves one configured model. The engine calls :meth:`Backend.generate`
with a :class:`GenerationRequest` and reads an async stream of events: zero or
more :class:`TextChunk` (in generation order, as soon as they exist) and then
exactly one :class:`GenerationResult` with the token counts the backend
reported and the finish reason. Errors are raised as
:class:`~p2pinfer.errors.InferenceError` subclasses (or
:class:`~p2pinfer.errors.InvalidParams` for a request the model cannot take,
such as a prompt longer than its context).

Callers must close the stream (``async with aclosing(backend.generate(...))``):
closing it early is how a request is cancelled, and a backend frees whatever
it holds (a llama.cpp instance, an HTTP connection) before ``aclose`` returns.

:class:`StopMatcher` is the sans-IO stop-sequence filter shared by the
backends that generate text themselves.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import trio

from ..prompts import GenerationParams, Message, ToolCall, missing_capability

__all__ = [
    "Backend",
    "Embeddings",
    "GenerationParams",
    "GenerationRequest",
    "GenerationResult",
    "Message",
    "ModelInfo",
    "ModelState",
    "StopMatcher",
    "StreamEvent",
    "TextChunk",
    "ToolCall",
    "estimate_tokens",
]

@dataclass(frozen=True)
class GenerationRequest:
    """What a backend is asked to do: answer ``messages`` with ``params``."""

    messages: tuple[Message, ...]
    params: GenerationParams = field(default_factory=GenerationParams)


@dataclass(frozen=True)
class TextChunk:
    """A piece of the answer, in order. Usually one token's text; with
    ``logprobs`` asked, the log probabilities of the tokens it holds
    (``{token, logprob, bytes, top_logprobs}`` each, OpenAI's shape)."""

    text: str
    logprobs: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    """The end of a generation.

    ``usage_exact`` is False when the backend did not report token counts
    (some OpenAI-compatible servers omit usage in streams); the counts are
    then estimates (one per streamed delta; about four characters per
    prompt token).
    """

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    usage_exact: bool = True
    # the calls the model made (finish_reason "tool_calls"), whole
    tool_calls: tuple[ToolCall, ...] = ()

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


StreamEvent = TextChunk | GenerationResult


@dataclass(frozen=True)
class Embeddings:
    """One vector per input text, in order, and the tokens they took."""

    vectors: list[list[float]]
    prompt_tokens: int


class ModelState(enum.Enum):
    """Whether a backend can serve: ``loading``, ``loaded`` or ``error``."""

    LOADING = "loading"
    LOADED = "loaded"
    ERROR = "error"


@dataclass(frozen=True)
class ModelInfo:
    """A model as a backend knows it (the remote catalog for HTTP backends)."""

    name: str
    backend: str
    context_length: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "backend": self.backend,
            "context_length": self.context_length,
        }
        if self.details:
            out["details"] = self.details
        return out


class Backend(ABC):
    """One configured model behind one engine.

    Subclasses set :attr:`kind`, implement :meth:`run` (long-lived: load the
    model or open the HTTP client, then call ``task_status.started()``),
    :meth:`generate` and :meth:`list_models`. ``slots`` is how many
    generations may run at once; the engine never asks for more.

    :attr:`capabilities` says which kinds of request it serves beyond plain
    chat (``json``: an answer constrained to JSON or to a schema, see
    :class:`~p2pinfer.prompts.OutputFormat`); a request needing one it lacks
    is refused with :class:`~p2pinfer.errors.MissingCapability` before it
    takes a slot, and gateways route it only to workers that have it.
    """

    kind: ClassVar[str] = "abstract"
    capabilities: ClassVar[frozenset[str]] = frozenset({"chat"})

    def __init__(self, name: str, *, slots: int) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.name = name
        self.slots = slots
        self.state = ModelState.LOADING
        self.error: str | None = None
        self.context_length: int | None = None
        # when the model was made, as far as this node can tell (Unix time):
        # a model file's modification time, else when this backend started
        self.created: float = time.time()
        self._settled = trio.Event()

    def _set_state(self, state: ModelState, error: str | None = None) -> None:
        self.state = state
        self.error = error
        if state is not ModelState.LOADING:
            self._settled.set()

    async def wait_settled(self) -> ModelState:
        """Wait until the backend is loaded or has failed; returns the state."""
        await self._settled.wait()
        return self.state

    @abstractmethod
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. ``task_status.started()`` comes as soon as
        requests may be submitted (they wait while a model loads)."""

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        """Stream :class:`TextChunk` events, then one :class:`GenerationResult`."""

    async def embed(self, texts: list[str]) -> Embeddings:
        """A vector for each text (backends with the ``embed`` capability)."""
        raise missing_capability(self.name, "embed")

    @abstractmethod
    async def list_models(self) -> list[ModelInfo]:
        """The models this backend's server offers (a local backend: itself)."""

    async def resize(self, slots: int) -> None:
        """Make room for ``slots`` generations at once (the engine calls it
        before it admits more, and after it stopped admitting when it
        shrinks). The default suits backends whose slot is only a
        concurrency limit (HTTP, synthetic); a backend that holds resources
        per slot overrides it, and must never take one from a running
        generation."""
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.slots = slots

    def info(self) -> ModelInfo:
        """What is known about this backend's model without asking anyone."""
        return ModelInfo(self.name, self.kind, self.context_length)

    def variant(self) -> str | None:
        """What runs the model, in a few words (None: nothing to say)."""
        return None

    def runtime(self) -> dict[str, Any] | None:
        """The process that runs the model, for ``getModelStatus`` (None: none)."""
        return None


def estimate_tokens(messages: tuple[Message, ...]) -> int:
    """A rough prompt size for backends that report none: ~4 chars a token
    plus a few template tokens per message."""
    return sum(4 + (len(m.content) + sum(len(c.arguments) for c in m.tool_calls) + 3) // 4
               for m in messages)


class StopMatcher:
    """Sans-IO stop-sequence filter over streamed text.

    :meth:`feed` returns the text that is safe to emit and whether a stop
    sequence was reached (the stop sequence itself is never emitted). The
    answer ends where the first stop sequence to be completed begins. Text
    that might be the beginning of a stop sequence is held back until the
    next piece decides it; :meth:`flush` releases it when the stream ends.
    """

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        # The stop sequence completed first wins (then the one starting first),
        # so the answer does not depend on how the text was cut into pieces.
        best: tuple[int, int] | None = None
        for stop in self.stops:
            idx = buf.find(stop)
            if idx >= 0 and (best is None or (idx + len(stop), idx) < best):
                best = (idx + len(stop), idx)
        if best is not None:
            cut = best[1]
            self._held = ""
            self.stopped = True
            return buf[:cut], True
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), hold, -1):
                if buf.endswith(stop[:n]):
                    hold = n
                    break
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held
