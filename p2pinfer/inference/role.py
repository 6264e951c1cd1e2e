"""The inference role: the inference service on a node.

RPC methods (all ``Access.MEMBER``: only network members, i.e. gateways and
other nodes, call a worker; users go through a gateway):

``processPrompt`` (server stream)
    params: see :mod:`p2pinfer.prompts` (``prompt`` or
    ``messages``, ``model``, ``max_tokens``, ``temperature``, ``top_p``,
    ``stop``, ``seed``, ``cache``, ``stream``, ``format``, ``raw``, ``tools``,
    ``tool_choice``, ``parallel_tool_calls``; or the
    sampling ones inside ``modelConfig``); a model without the capability a
    request needs refuses it with MissingCapability. Chunks:
    ``{"delta": "<text>"}`` in generation order (with ``logprobs`` asked,
    ``{"delta", "logprobs": [{"token", "logprob", "bytes", "top_logprobs"}]}``,
    the log probabilities of the chunk's tokens),
    usually one token each (tokens that wait while the stream is busy are
    merged, and so are a local model's tokens less than 50 ms apart, times
    the answers its runner is generating at once, at most 250 ms; a
    cached answer comes as one chunk). With ``"stream": false``
    the whole answer comes as one chunk once it is complete (one frame
    instead of one per token, and a caller that has received nothing may
    safely retry elsewhere). Trailer (END frame)::

        {"model": "smollm2", "backend": "llamacpp", "finish_reason": "stop",
         "usage": {"prompt_tokens": 38, "completion_tokens": 12, "total_tokens": 50},
         "usage_exact": true, "cached": false,
         "ttft_ms": 190.2, "latency_ms": 410.7, "queue_ms": 0.1}

    ``finish_reason`` is ``stop`` (end of answer or a stop sequence),
    ``length`` (``max_tokens`` or the context), ``tool_calls`` (the model
    called tools: the trailer then has ``"tool_calls": [{"id", "name",
    "arguments"}]``, the arguments JSON text; calls never come as chunks) or
    ``cancelled`` (the node is shutting down). On llama.cpp a tool request
    is asked in a generic JSON form under a grammar, so every call names one
    of the tools and its arguments match its ``parameters`` schema, whatever
    the model's chat template (see ``p2pinfer/inference/toolcalls.py``).
    Errors: InvalidParams, UnknownModel, Overloaded
    (``data.retry_after``), BackendUnavailable, ModelUnavailable
    (``data.retry_after``: the model's runner is restarting), BackendError,
    BackendTimeout, MalformedBackendResponse.

``embed`` (server stream, one chunk)
    params: ``{"input": "text" | ["text", ...], "model"?, "share"?}`` (at most
    256 texts); the model needs the capability ``embed`` (the embedded
    ``all-minilm``, 384 dimensions). Chunk: ``{"embeddings": [[float, ...],
    ...]}``, one unit vector per text, in order. Trailer: ``{"model",
    "backend", "usage": {"prompt_tokens", "total_tokens"}, "latency_ms",
    "queue_ms"}``. A stream, so that a gateway routes and fails it over as
    it does answers.

``listAvailableModels``
    ``{"models": [{"name", "aliases", "backend", "context_length", "status",
    "default", "details"}], "default_model": "smollm2"}``

``getModelStatus`` (params: ``"smollm2"``, ``{"model": ...}`` or ``{"modelId": ...}``)
    ``{"model", "aliases", "backend", "status": "loaded"|"loading"|"error",
    "error", "context_length", "slots", "free_slots", "in_flight",
    "queue_depth", "max_queue", "tok_s", "ttft_ms", "latency_ms",
    "requests": {outcome: n}, "tokens_generated", "prompt_tokens",
    "cache": {"hits", "misses"}}``; a local (``llamacpp``) model adds
    ``"runner"`` (a line: ``"llama-server, AVX2 AVX512, repack on"``) and
    ``"runtime"``::

        {"engine": "llama-server", "pid": 4242, "state": "running",  # restarting, starting, failed
         "variant": "llama-server, AVX2 AVX512, repack on",
         "repack": true, "repack_reason": "default: weights repacked ...",
         "cpu_features": ["AVX2", "AVX512", ...], "repacked_buffers_mib": {"CPU_REPACK": 60.1},
         "slots": 2, "kv_cache": {"n_ctx_per_slot": 2048, "mib_total": 90.0, "mib_per_slot": 45.0},
         "devices": {"CPU": "AMD EPYC"}, "gpu_layers": null,  # or {"offloaded": 31, "total": 31}
         "threads": 2, "restarts": 0,
         "last_exits": [{"exit": "SIGSEGV", "after_s": 12.5, "log": "..."}]}

    While a model's runner restarts after it died, ``processPrompt`` fails at
    once with ModelUnavailable (``data.retry_after``); a stream cut by the
    runner's death ends with the same error.

The node builds the role with ``InferenceRole(node)`` (it reads
``node.config`` and ``node.registry``), registers it on its RPC server,
runs :meth:`InferenceRole.run` in its nursery, merges :meth:`describe` into
its signed descriptor and announces :meth:`topics` on the DHT.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import httpx2
import trio

from ..errors import InvalidParams
from ..grants import OBSERVERS
from ..prompts import parse_embed_params, parse_model_name, parse_prompt_params
from ..rpc.server import Access, CallContext, rpc_method
from .cache import ResponseCache
from .engine import Completion, InferenceEngine
from .metrics import InferenceMetrics
from .settings import InferenceSettings, build_models

if TYPE_CHECKING:  # pragma: no cover
    from ..context import RoleContext

__all__ = ["InferenceRole"]

log = logging.getLogger(__name__)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _share(ctx: CallContext, params: Any) -> tuple[Any, str]:
    """The params without ``share``, and the share (the caller's by default)."""
    if not (isinstance(params, dict) and "share" in params):
        return params, ctx.peer_id
    params = dict(params)
    share = params.pop("share")
    if not isinstance(share, str) or not 0 < len(share) <= 64:
        raise InvalidParams("share: must be a string of 1 to 64 characters",
                            data={"field": "share"})
    return params, share


def trailer_for(done: Completion) -> dict[str, Any]:
    """The END-frame trailer of ``processPrompt`` for a finished answer
    (with ``tool_calls`` when the model called tools: they travel whole, at
    the end, never as text chunks)."""
    trailer: dict[str, Any] = {
        "model": done.model,
        "backend": done.backend,
        "finish_reason": done.finish_reason,
        "usage": {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "total_tokens": done.total_tokens,
        },
        "usage_exact": done.usage_exact,
        "cached": done.cached,
        "ttft_ms": _ms(done.ttft),
        "latency_ms": _ms(done.latency),
        "queue_ms": _ms(done.queued),
    }
    if done.tool_calls:
        trailer["tool_calls"] = [c.to_dict() for c in done.tool_calls]
    return trailer


class InferenceRole:
    """Serves the node's models over RPC (see the module docstring).

    Args:
        node: the node (its config and registry); outside a node,
            :class:`p2pinfer.testing.FakeContext`.
        http_transport: an httpx2 transport for every HTTP backend (tests).

    Raises:
        ConfigError: a bad ``[inference]`` or ``[[models]]`` value, named.
    """

    name = "inference"

    def __init__(self, node: RoleContext, *,
                 http_transport: httpx2.AsyncBaseTransport | None = None) -> None:
        self.node = node
        self.settings = InferenceSettings.from_config(node.config)
        self.metrics = InferenceMetrics(node.registry)
        cache = (ResponseCache(self.settings.cache_size, self.settings.cache_ttl)
                 if self.settings.cache else None)
        self.engine = InferenceEngine(cache=cache, metrics=self.metrics)
        for entry in build_models(node.config.tree, self.settings, transport=http_transport):
            self.engine.add_model(entry.backend, aliases=entry.aliases,
                                  max_queue=entry.max_queue, default=entry.default)
        if self.settings.default_model is not None:
            self.engine.default_model = self.engine.resolve(self.settings.default_model).name

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start the backends (models load in the background; requests wait for
        them) and serve until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.engine.run)
            nursery.start_soon(self._announce_when_settled)
            task_status.started()

    async def _announce_when_settled(self) -> None:
        """Re-sign the node's descriptor once every model has loaded (or failed)."""
        states = await self.engine.wait_settled()
        log.info("models settled: %s", ", ".join(f"{k}={v}" for k, v in states.items()))
        self.node.invalidate_descriptor()

    def describe(self) -> dict[str, Any]:
        """Models and load figures for the node's signed descriptor."""
        return self.engine.describe()

    def topics(self) -> list[str]:
        """``model/<name>`` for every model name and alias served here."""
        return [f"model/{name}" for name in self.engine.names()]

    @rpc_method("processPrompt", access=Access.MEMBER, grants=("gateway",))
    async def rpc_process_prompt(self, ctx: CallContext, params: Any
                                 ) -> AsyncGenerator[dict[str, Any], None]:
        """Stream an answer to a prompt; the trailer carries usage and timing.

        Besides the prompt parameters, a gateway names the request's
        ``share`` (an opaque token per user, at most 64 characters): slots
        are shared fairly between shares. Without it, the calling gateway's
        requests are one share."""
        params, share = _share(ctx, params)
        request = replace(parse_prompt_params(params, self.settings.limits), share=share)
        whole: list[str] | None = None if request.stream else []
        scores: list[dict[str, Any]] = []
        async with aclosing(self.engine.generate(request)) as events:
            async for event in events:
                if isinstance(event, Completion):
                    ctx.trailer = trailer_for(event)
                    log.info("answered with %s for %s: %d+%d tokens, %s, %.0f ms%s",
                             event.model, ctx.peer_id[-8:], event.prompt_tokens,
                             event.completion_tokens, event.finish_reason,
                             event.latency * 1000, " (cached)" if event.cached else "")
                elif whole is not None:
                    whole.append(event.text)
                    scores.extend(event.logprobs)
                elif event.logprobs:
                    yield {"delta": event.text, "logprobs": list(event.logprobs)}
                else:
                    yield {"delta": event.text}
        if whole or scores:  # a whole answer: one frame, nothing sent before it is complete
            yield {"delta": "".join(whole or ()), **({"logprobs": scores} if scores else {})}

    @rpc_method("embed", access=Access.MEMBER, grants=("gateway",))
    async def rpc_embed(self, ctx: CallContext, params: Any
                        ) -> AsyncGenerator[dict[str, Any], None]:
        """Embed texts (one chunk); the trailer carries usage and timing."""
        params, share = _share(ctx, params)
        request = replace(parse_embed_params(params), share=share)
        result = await self.engine.embed(request)
        ctx.trailer = {
            "model": result.model, "backend": result.backend,
            "usage": {"prompt_tokens": result.prompt_tokens,
                      "total_tokens": result.prompt_tokens},
            "latency_ms": _ms(result.latency), "queue_ms": _ms(result.queued),
        }
        log.info("embedded %d texts with %s for %s: %d tokens, %.0f ms", len(request.texts),
                 result.model, ctx.peer_id[-8:], result.prompt_tokens, result.latency * 1000)
        yield {"embeddings": result.vectors}

    @rpc_method("listAvailableModels", access=Access.MEMBER, grants=tuple(OBSERVERS))
    async def rpc_list_available_models(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """The model catalog of this node."""
        if params not in (None, {}):
            raise InvalidParams("params: listAvailableModels takes none",
                                data={"field": "params"})
        return {"models": self.engine.list_models(),
                "default_model": self.engine.default_model}

    @rpc_method("getModelStatus", access=Access.MEMBER, grants=tuple(OBSERVERS))
    async def rpc_get_model_status(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """Health and load of one model (the default model if none is named)."""
        name: Any = params
        if isinstance(params, dict):
            extra = set(params) - {"model", "modelId"}
            if extra:
                raise InvalidParams(f"{sorted(map(str, extra))[0]}: unknown key",
                                    data={"field": str(sorted(map(str, extra))[0])})
            if "model" in params and "modelId" in params:
                raise InvalidParams("modelId: give model or modelId, not both",
                                    data={"field": "modelId"})
            name = params.get("model", params.get("modelId"))
        if name is not None:
            name = parse_model_name(name, "model")
        return self.engine.status(name)
