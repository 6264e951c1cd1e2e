"""The OpenAI-compatible backend: any server with ``/v1/chat/completions``.

OpenAI itself, vLLM, llama.cpp's servers, LM Studio, ... The base URL
includes the version path (``https://api.openai.com/v1``, the default;
``OPENAI_BASE_URL`` overrides it) and ``OPENAI_API_KEY`` is sent as a bearer
token when set.

Requests stream (``"stream": true``) as server-sent events: ``data: {json}``
chunks with ``choices[0].delta.content``, a chunk with ``finish_reason``, and
``data: [DONE]``. Usage is requested with ``stream_options.include_usage``;
servers that ignore it (llama-cpp-python's server does) get estimated counts
(one per streamed delta, ~4 characters a prompt token) and the result says
``usage_exact=False``. A stream that ends before ``[DONE]`` is a
:class:`~p2pinfer.errors.MalformedBackendResponse`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import httpx2

from ..errors import BackendError, MalformedBackendResponse
from ..prompts import token_logprobs
from .backend import (
    GenerationParams,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    StreamEvent,
    TextChunk,
    estimate_tokens,
)
from .remote import HttpBackend, SSEDecoder, parse_json_line
from .toolcalls import ToolCallDeltas

__all__ = ["DEFAULT_OPENAI_URL", "OpenAIBackend", "chat_request_body", "choice_logprobs",
           "completion_request_body"]

DEFAULT_OPENAI_URL = "https://api.openai.com/v1"


def _sampled(model: str, params: GenerationParams, **content: Any) -> dict[str, Any]:
    """A streamed request body with ``content`` (messages or a prompt) and
    the sampling parameters, asking for token counts in the stream."""
    body: dict[str, Any] = {
        "model": model,
        **content,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    return body


def chat_request_body(model: str, request: GenerationRequest) -> dict[str, Any]:
    """A streamed ``/chat/completions`` request for ``request``, asking for
    token counts in the stream (``stream_options.include_usage``)."""
    params = request.params
    body = _sampled(model, params, messages=[m.to_dict() for m in request.messages])
    fmt = params.format
    if fmt is not None:
        body["response_format"] = {"type": "json_object"} if fmt.schema is None else {
            "type": "json_schema",
            "json_schema": {"name": fmt.name, "schema": fmt.schema, "strict": fmt.strict}}
    if params.logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = params.top_logprobs
    if params.tools:
        body["tools"] = [t.to_openai() for t in params.tools]
        body["tool_choice"] = params.tool_choice if params.forced_tool is None else {
            "type": "function", "function": {"name": params.forced_tool}}
        if not params.parallel_tool_calls:
            body["parallel_tool_calls"] = False
    return body


def completion_request_body(model: str, request: GenerationRequest) -> dict[str, Any]:
    """A streamed legacy ``/completions`` request for a raw ``request``: its
    one message's text is continued as it is, without the chat template."""
    return _sampled(model, request.params, prompt=request.messages[-1].content)


def choice_logprobs(choice: dict[str, Any], top: int) -> tuple[dict[str, Any], ...]:
    """The token log probabilities of a streamed choice (``logprobs.content``),
    with at most ``top`` alternatives each (llama-server sends 20 when asked
    for none)."""
    raw = choice.get("logprobs")
    if not isinstance(raw, dict) or not raw.get("content"):
        return ()
    entries = token_logprobs(raw["content"])
    for entry in entries:
        entry["top_logprobs"] = entry["top_logprobs"][:top]
    return tuple(entries)


def _int(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise MalformedBackendResponse(f"{what}: expected a token count, got {value!r}")
    return value


class OpenAIBackend(HttpBackend):
    """A model on an OpenAI-compatible server."""

    kind = "openai"
    # response_format, legacy /completions, tools and logprobs, passed on
    capabilities = frozenset({"chat", "json", "complete", "tools", "logprobs"})

    def __init__(
        self,
        name: str,
        *,
        base_url: str = DEFAULT_OPENAI_URL,
        api_key: str | None = None,
        remote_model: str | None = None,
        slots: int = 4,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        probe_interval: float = 30.0,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        super().__init__(
            name,
            base_url=base_url,
            remote_model=remote_model or name,
            slots=slots,
            timeout=timeout,
            connect_timeout=connect_timeout,
            probe_interval=probe_interval,
            transport=transport,
            headers=headers,
        )

    async def list_models(self) -> list[ModelInfo]:
        """``GET /models``: the server's catalog."""
        body = await self.get_json("/models")
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise MalformedBackendResponse(f"GET /models on the {self.where}: no 'data' list")
        out = []
        for item in data:
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                ctx = item.get("context_length") or item.get("max_model_len")
                out.append(ModelInfo(item["id"], self.kind,
                                     ctx if type(ctx) is int else None,
                                     {"owned_by": str(item.get("owned_by", ""))[:64]}))
        return out

    def request_body(self, request: GenerationRequest) -> dict[str, Any]:
        """The JSON body of ``POST /chat/completions`` for ``request`` (of
        ``POST /completions`` for a raw one)."""
        if request.params.raw:
            return completion_request_body(self.remote_model, request)
        return chat_request_body(self.remote_model, request)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        raw = request.params.raw
        what = f"{'completion' if raw else 'chat completion'} on the {self.where}"
        decoder = SSEDecoder()
        deltas = 0
        finish: str | None = None
        usage: dict[str, Any] | None = None
        done = False
        calls = ToolCallDeltas()
        path = "/completions" if raw else "/chat/completions"
        async with self.open_stream(path, self.request_body(request)) as lines:
            async for line in lines:
                for data in decoder.feed_line(line):
                    if data.strip() == "[DONE]":
                        done = True
                        break
                    obj = parse_json_line(data, what)
                    if "error" in obj:
                        err = obj["error"]
                        message = err.get("message") if isinstance(err, dict) else err
                        raise BackendError(f"{what}: {str(message)[:300]}")
                    if isinstance(obj.get("usage"), dict):
                        usage = obj["usage"]
                    choices = obj.get("choices")
                    if not isinstance(choices, list):
                        raise MalformedBackendResponse(f"{what}: a chunk without 'choices'")
                    for choice in choices[:1]:
                        if not isinstance(choice, dict):
                            raise MalformedBackendResponse(f"{what}: a choice is not an object")
                        if raw:
                            content = choice.get("text")
                        else:
                            delta = choice.get("delta") or {}
                            content = delta.get("content") if isinstance(delta, dict) else None
                            if isinstance(delta, dict) and delta.get("tool_calls"):
                                calls.feed(delta["tool_calls"])
                        if content is not None and not isinstance(content, str):
                            raise MalformedBackendResponse(f"{what}: the answer is not text")
                        scores = (choice_logprobs(choice, request.params.top_logprobs)
                                  if request.params.logprobs else ())
                        if content or scores:
                            deltas += 1
                            yield TextChunk(content or "", scores)
                        reason = choice.get("finish_reason")
                        if isinstance(reason, str) and reason:
                            finish = reason[:32]
                if done:
                    break
        if not done:
            for data in decoder.close():
                done = data.strip() == "[DONE]"
        if not done:
            raise MalformedBackendResponse(f"{what}: the stream ended before [DONE]")
        made = calls.calls()
        if made:
            finish = "tool_calls"
        if usage is not None and "completion_tokens" in usage:
            prompt = _int(usage.get("prompt_tokens", 0), f"{what}: usage.prompt_tokens")
            completion = _int(usage["completion_tokens"], f"{what}: usage.completion_tokens")
            yield GenerationResult(prompt, completion, finish or "stop", tool_calls=made)
        else:
            yield GenerationResult(estimate_tokens(request.messages), deltas + len(made),
                                   finish or "stop", usage_exact=False, tool_calls=made)
