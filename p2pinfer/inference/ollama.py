"""The Ollama backend: ``OLLAMA_URL`` (default ``http://127.0.0.1:11434``).

- ``POST /api/chat`` with ``"stream": true`` answers newline-delimited JSON:
  ``{"message": {"role": "assistant", "content": "..."}, "done": false}`` per
  piece, then a final object with ``"done": true``, ``done_reason``,
  ``prompt_eval_count`` and ``eval_count`` (the token counts we report) and
  durations in nanoseconds. An ``{"error": "..."}`` line is a backend error.
- ``GET /api/tags`` is the catalog; ``POST /api/show`` gives the context length
  (``model_info["<arch>.context_length"]``).

Sampling parameters go in ``options`` (``num_predict`` is ``max_tokens``).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import httpx2

from ..errors import BackendError, MalformedBackendResponse, P2PInferError
from .backend import (
    GenerationRequest,
    GenerationResult,
    Message,
    ModelInfo,
    ModelState,
    StreamEvent,
    TextChunk,
    estimate_tokens,
)
from .remote import HttpBackend, parse_json_line
from .toolcalls import ToolCallDeltas

__all__ = ["DEFAULT_OLLAMA_URL", "OllamaBackend"]

DEFAULT_OLLAMA_URL = "http://127.0.0.1:11434"


def _ollama_message(message: Message) -> dict[str, Any]:
    """A message in Ollama's chat shape: a call's arguments are an object."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [{"function": {"name": c.name, "arguments": c.parsed_arguments()}}
                             for c in message.tool_calls]
    return out


def _count(value: Any) -> int | None:
    return value if type(value) is int and value >= 0 else None


class OllamaBackend(HttpBackend):
    """A model on an Ollama server (or anything that speaks its API)."""

    kind = "ollama"
    # Ollama's format, and /api/generate with raw: passed on
    capabilities = frozenset({"chat", "json", "complete", "tools"})

    def __init__(
        self,
        name: str,
        *,
        base_url: str = DEFAULT_OLLAMA_URL,
        remote_model: str | None = None,
        slots: int = 4,
        timeout: float = 120.0,
        connect_timeout: float = 5.0,
        probe_interval: float = 30.0,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            name,
            base_url=base_url,
            remote_model=remote_model or name,
            slots=slots,
            timeout=timeout,
            connect_timeout=connect_timeout,
            probe_interval=probe_interval,
            transport=transport,
        )

    async def list_models(self) -> list[ModelInfo]:
        """``GET /api/tags``: the models the server has pulled."""
        body = await self.get_json("/api/tags")
        models = body.get("models") if isinstance(body, dict) else None
        if not isinstance(models, list):
            raise MalformedBackendResponse(f"GET /api/tags on the {self.where}: no 'models' list")
        out = []
        for item in models:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                continue
            raw = item.get("details")
            details: dict[str, Any] = raw if isinstance(raw, dict) else {}
            keep = {k: details[k] for k in ("family", "parameter_size", "quantization_level",
                                            "format") if isinstance(details.get(k), str)}
            out.append(ModelInfo(item["name"], self.kind, None, keep))
        return out

    async def probe(self) -> None:
        await super().probe()
        if self.state is ModelState.LOADED and self.context_length is None:
            try:
                show = await self.post_json("/api/show", {"model": self.remote_model})
            except P2PInferError:
                return  # the context length is a nicety; the model works
            info = show.get("model_info") if isinstance(show, dict) else None
            if isinstance(info, dict):
                for key, value in info.items():
                    if key.endswith(".context_length") and type(value) is int:
                        self.context_length = value
                        break

    def request_body(self, request: GenerationRequest) -> dict[str, Any]:
        """The JSON body of ``POST /api/chat`` for ``request`` (of ``POST
        /api/generate`` with ``raw`` for a raw one)."""
        params = request.params
        options: dict[str, Any] = {
            "num_predict": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.stop:
            options["stop"] = list(params.stop)
        if params.seed is not None:
            options["seed"] = params.seed
        if params.raw:
            return {"model": self.remote_model, "prompt": request.messages[-1].content,
                    "raw": True, "stream": True, "options": options}
        body: dict[str, Any] = {
            "model": self.remote_model,
            "messages": [_ollama_message(m) for m in request.messages],
            "stream": True,
            "options": options,
        }
        if params.format is not None:
            body["format"] = "json" if params.format.schema is None else params.format.schema
        if params.calls_tools:
            # Ollama has no tool_choice: a named tool is the only one offered
            body["tools"] = [t.to_openai() for t in params.tools
                             if params.forced_tool in (None, t.name)]
        return body

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        raw = request.params.raw
        what = f"{'generate' if raw else 'chat'} on the {self.where}"
        deltas = 0
        final: dict[str, Any] | None = None
        calls = ToolCallDeltas()
        path = "/api/generate" if raw else "/api/chat"
        async with self.open_stream(path, self.request_body(request)) as lines:
            async for line in lines:
                if not line.strip():
                    continue
                obj = parse_json_line(line, what)
                if "error" in obj:
                    raise BackendError(f"{what}: {str(obj['error'])[:300]}")
                message = obj.get("message")
                if raw and "response" in obj:  # /api/generate's lines
                    message = {"content": obj["response"]}
                if message is not None:
                    if not isinstance(message, dict):
                        raise MalformedBackendResponse(f"{what}: 'message' is not an object")
                    content = message.get("content", "")
                    if not isinstance(content, str):
                        raise MalformedBackendResponse(f"{what}: message.content is not text")
                    if content:
                        deltas += 1
                        yield TextChunk(content)
                    if message.get("tool_calls"):
                        calls.feed(message["tool_calls"])
                done = obj.get("done")
                if done is True:
                    final = obj
                    break
                if done is not False:
                    raise MalformedBackendResponse(f"{what}: a line without a boolean 'done'")
        if final is None:
            raise MalformedBackendResponse(f"{what}: the stream ended before done=true")
        reason = final.get("done_reason")
        made = calls.calls()
        finish = "tool_calls" if made else "length" if reason == "length" else "stop"
        prompt, completion = _count(final.get("prompt_eval_count")), _count(
            final.get("eval_count"))
        if completion is None:
            yield GenerationResult(
                prompt if prompt is not None else estimate_tokens(request.messages),
                deltas + len(made), finish, usage_exact=False, tool_calls=made)
            return
        # Ollama omits prompt_eval_count when the whole prompt came from its cache.
        yield GenerationResult(prompt or 0, completion, finish, usage_exact=prompt is not None,
                               tool_calls=made)
