"""A synthetic backend for load tests: instant, deterministic, exact counts.

**Not a model.** It answers with words drawn deterministically from the
request (a hash of the messages and the seed), so benchmarks and tests of
the layers above inference (gateway routing, rate limits, 1,000 concurrent
requests) can run without spending CPU on a model. It is off unless a
``[[models]]`` entry asks for ``backend = "synthetic"``.

Counts are exact by definition: the prompt is one token per
whitespace-separated word of every message plus :data:`TOKENS_PER_MESSAGE`
template tokens per message; the answer is ``min(tokens, max_tokens)``
tokens, each one word followed by a space, and ``finish_reason`` is
``length`` when ``max_tokens`` cut it short, ``stop`` otherwise (stop
sequences apply as usual). ``token_delay`` sleeps between tokens to
imitate a model's pace; ``first_token_delay`` imitates prompt processing.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator
from typing import Any

import trio

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

__all__ = ["SyntheticBackend", "TOKENS_PER_MESSAGE", "synthetic_prompt_tokens"]

TOKENS_PER_MESSAGE = 3
_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
    "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()


def synthetic_prompt_tokens(request: GenerationRequest) -> int:
    """The prompt token count the synthetic backend reports for ``request``
    (a raw prompt has no template tokens)."""
    template = 0 if request.params.raw else TOKENS_PER_MESSAGE
    return sum(len(m.content.split()) + template for m in request.messages)


class SyntheticBackend(Backend):
    """Instant deterministic answers for load testing (see the module docstring).

    Args:
        name: the model's name on this node.
        tokens: answer length before ``max_tokens`` applies.
        token_delay: seconds between two tokens.
        first_token_delay: seconds before the first token.
        slots: generations at once (a synthetic slot costs nothing).
        context_length: reported in the catalog.
    """

    kind = "synthetic"
    # a raw prompt is answered like any other (there is no template to skip);
    # it cannot constrain its words to JSON
    capabilities = frozenset({"chat", "complete"})

    def __init__(
        self,
        name: str,
        *,
        tokens: int = 16,
        token_delay: float = 0.0,
        first_token_delay: float = 0.0,
        slots: int = 1024,
        context_length: int = 8192,
    ) -> None:
        super().__init__(name, slots=slots)
        self.tokens = tokens
        self.token_delay = token_delay
        self.first_token_delay = first_token_delay
        self.context_length = context_length

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._set_state(ModelState.LOADED)
        task_status.started()
        await trio.sleep_forever()

    async def list_models(self) -> list[ModelInfo]:
        return [self.info()]

    def info(self) -> ModelInfo:
        return ModelInfo(self.name, self.kind, self.context_length,
                         {"tokens": self.tokens, "token_delay": self.token_delay})

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        params = request.params
        digest = hashlib.sha256()
        for m in request.messages:
            digest.update(f"{m.role}\0{m.content}\0".encode())
        digest.update(str(params.seed).encode())
        state = int.from_bytes(digest.digest()[:8], "big")
        n = min(self.tokens, params.max_tokens)
        finish = "length" if params.max_tokens < self.tokens else "stop"
        stopper = StopMatcher(params.stop)
        if self.first_token_delay:
            await trio.sleep(self.first_token_delay)
        produced = 0
        for i in range(n):
            if i and self.token_delay:
                await trio.sleep(self.token_delay)
            else:
                await trio.lowlevel.checkpoint()
            state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
            produced += 1
            text, stopped = stopper.feed(_WORDS[(state >> 40) % len(_WORDS)] + " ")
            if text:
                yield TextChunk(text)
            if stopped:
                finish = "stop"
                break
        if not stopper.stopped:
            tail = stopper.flush()
            if tail:
                yield TextChunk(tail)
        yield GenerationResult(synthetic_prompt_tokens(request), produced, finish)
