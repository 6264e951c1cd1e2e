"""The Ollama-compatible API, so Ollama clients (and p2pinfer's own Ollama
backend on another swarm) can use the swarm unchanged.

Authenticated with the API key: ``Authorization: Bearer <key>`` (what the
``ollama`` package sends from ``OLLAMA_API_KEY`` or its ``headers``),
``X-API-Key``, or HTTP Basic with the key as the password (a URL like
``http://p2p:<key>@host:3000``). Errors are ``{"error": "message"}``; a
model no worker serves is 404, like a model Ollama has not pulled.

- ``POST /api/chat``: ``model``, ``messages`` (``role``, ``content``),
  ``stream`` (default true), ``options`` (``num_predict``, ``temperature``,
  ``top_p``, ``stop``, ``seed``; other options are ignored), ``format``
  (``"json"`` or a JSON schema: the answer is constrained to it). NDJSON lines
  ``{"model", "created_at", "message": {"role": "assistant", "content"},
  "done": false}``, then ``"done": true`` with ``done_reason``,
  ``prompt_eval_count``, ``eval_count`` and durations in nanoseconds.
- ``POST /api/generate``: ``prompt`` (+ ``system``), the same options,
  ``raw`` (the prompt continued without the chat template);
  ``"response"`` instead of ``"message"``. An empty prompt answers at once
  with ``done_reason: "load"``, as Ollama does.
- ``GET /api/tags``, ``POST /api/show``, ``GET /api/ps``: the swarm's
  models (names without a tag are listed as ``name:latest``, and accepted
  either way); ``GET /api/version``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ..errors import InvalidParams, P2PInferError, UnknownModel
from .api import prepare_inference
from .credentials import credentials_from_headers
from .inputs import read_json
from .openai_api import openai_tools
from .responses import dumps
from .upstream import model_names

if TYPE_CHECKING:  # pragma: no cover
    from .site import WebSite

__all__ = ["OLLAMA_PATHS", "OllamaDialect", "ollama_request", "ollama_routes"]

OLLAMA_PATHS = frozenset({"/api/chat", "/api/generate", "/api/tags", "/api/show", "/api/ps",
                          "/api/version", "/api/embed", "/api/embeddings",
                          # Ollama's routes that p2pinfer does not serve: an
                          # Ollama client is told so in Ollama's error shape
                          "/api/pull", "/api/push", "/api/create", "/api/copy",
                          "/api/delete"})
EMBED_KEYS = ("model", "input", "truncate", "options", "keep_alive", "dimensions")
CHAT_KEYS = ("model", "messages", "stream", "options", "format", "keep_alive", "tools",
             "think")
GENERATE_KEYS = ("model", "prompt", "system", "stream", "options", "format", "keep_alive",
                 "raw", "context", "suffix", "images", "template", "think")
NS = 1_000_000  # nanoseconds per millisecond


def _fail(field: str, problem: str) -> InvalidParams:
    return InvalidParams(f"{field}: {problem}", data={"field": field})


def _now(at: float | None = None) -> str:
    when = datetime.datetime.now(datetime.UTC) if at is None else \
        datetime.datetime.fromtimestamp(at, datetime.UTC)
    return when.isoformat().replace("+00:00", "Z")


def _modified(model: dict[str, Any]) -> str:
    """When the model was made, as its workers tell (see ``/v1/models``)."""
    created = model.get("created")
    return _now(float(created)) if isinstance(created, int) and created > 0 else _now()


def tag_name(name: str) -> str:
    """How Ollama names a model: with a tag (``smollm2:latest``)."""
    return name if ":" in name else f"{name}:latest"


def _options(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise _fail("options", "must be an object")
    out: dict[str, Any] = {}
    limit = options.get("num_predict")
    if limit is not None and not (type(limit) is int and limit < 0):  # -1, -2: no limit
        out["max_tokens"] = limit
    for key in ("temperature", "top_p", "stop", "seed"):
        if options.get(key) is not None:
            out[key] = options[key]
    return out


def ollama_request(body: dict[str, Any], *, chat: bool) -> tuple[dict[str, Any], bool]:
    """An ``/api/chat`` or ``/api/generate`` body → (p2pinfer request, stream)."""
    allowed = CHAT_KEYS if chat else GENERATE_KEYS
    for key in body:
        if key not in allowed:
            raise _fail(str(key)[:64], "unknown field")
    fmt = body.get("format")
    if fmt not in (None, "") and fmt != "json" and not isinstance(fmt, dict):
        raise _fail("format", 'must be "json" or a JSON schema')
    if body.get("tools"):
        params_tools = openai_tools(body["tools"])
    for key in ("suffix", "images", "template", "context"):
        if body.get(key):
            raise _fail(key, "not supported")
    raw = body.get("raw", False)
    if raw is None:
        raw = False
    if not isinstance(raw, bool):
        raise _fail("raw", "must be true or false")
    stream = body.get("stream", True)
    if stream is None:
        stream = True
    if not isinstance(stream, bool):
        raise _fail("stream", "must be true or false")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _fail("model", "required")
    params: dict[str, Any] = {"model": model, **_options(body.get("options"))}
    if body.get("tools"):
        params["tools"] = params_tools
    if fmt == "json":
        params["format"] = "json"
    elif isinstance(fmt, dict):
        params["format"] = {"type": "json_schema", "schema": fmt}
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise _fail("messages", "must be a list")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise _fail(f"messages[{i}]", "must be an object")
            for key in m:
                if key not in ("role", "content", "images", "thinking", "tool_calls",
                               "tool_name", "tool_call_id"):
                    raise _fail(f"messages[{i}].{str(key)[:32]}", "unknown field")
                if key == "images" and m[key]:
                    raise _fail(f"messages[{i}].{key}", "not supported")
            message: dict[str, Any] = {"role": m.get("role"), "content": m.get("content", "")}
            if m.get("tool_calls"):
                message["tool_calls"] = _calls_in(m["tool_calls"], f"messages[{i}].tool_calls")
            if m.get("role") == "tool":
                # Ollama names the tool, not the call: either will do as a reference
                message["tool_call_id"] = m.get("tool_call_id") or m.get("tool_name") or "tool"
            out.append(message)
        params["messages"] = out
    else:
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise _fail("prompt", "must be a string")
        params["prompt"] = prompt
        if body.get("system") is not None:
            params["system"] = body["system"]
        if raw:  # the prompt is continued as it is, without the template
            params["raw"] = True
    return params, stream


def _calls_in(value: Any, field: str) -> list[dict[str, Any]]:
    """An assistant message's Ollama ``tool_calls`` ({function: {name,
    arguments: {...}}}) as p2pinfer's {id, name, arguments (JSON text)}."""
    if not isinstance(value, list):
        raise _fail(field, "must be a list")
    out = []
    for i, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise _fail(f"{field}[{i}]", "must be {function: {name, arguments}}")
        arguments = function.get("arguments", {})
        out.append({"id": call.get("id") or f"call_{i}", "name": function.get("name"),
                    "arguments": arguments if isinstance(arguments, str)
                    else json.dumps(arguments, ensure_ascii=False)})
    return out


def _calls_out(trailer: dict[str, Any]) -> list[dict[str, Any]]:
    """The calls an answer made, in Ollama's shape (arguments as an object)."""
    out = []
    for call in trailer.get("tool_calls") or []:
        try:
            arguments = json.loads(call["arguments"])
        except ValueError:
            arguments = {}
        out.append({"id": call["id"], "function": {"name": call["name"],
                                                   "arguments": arguments}})
    return out


class OllamaDialect:
    """Ollama's NDJSON stream for ``/api/chat`` (``chat``) or ``/api/generate``."""

    media_type = "application/x-ndjson"

    def __init__(self, model: str, *, chat: bool) -> None:
        self.model = model
        self.chat = chat

    def _piece(self, text: str) -> dict[str, Any]:
        if self.chat:
            return {"message": {"role": "assistant", "content": text}}
        return {"response": text}

    def start(self) -> bytes:
        return b""

    def delta(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> bytes:
        return dumps({"model": self.model, "created_at": _now(), **self._piece(text),
                      "done": False}) + b"\n"

    def final(self, trailer: dict[str, Any], text: str = "", *,
              calls: bool = True) -> dict[str, Any]:
        raw = trailer.get("usage")
        usage: dict[str, Any] = raw if isinstance(raw, dict) else {}
        total = int(float(trailer.get("latency_ms") or 0) * NS)
        prompt_ns = int(float(trailer.get("ttft_ms") or 0) * NS)
        eval_ns = max(0, total - prompt_ns)
        worker_ttft = trailer.get("worker_ttft_ms")
        worker_total = trailer.get("worker_latency_ms")
        if isinstance(worker_ttft, int | float) and isinstance(worker_total, int | float):
            # the model's own timings: a whole answer ("stream": false)
            # reaches the gateway as one frame, so its first token time is
            # the total and the generation would read as taking no time
            queued = trailer.get("worker_queue_ms")
            queued = float(queued) if isinstance(queued, int | float) else 0.0
            prompt_ns = int(max(0.0, float(worker_ttft) - queued) * NS)
            eval_ns = int(max(0.0, float(worker_total) - float(worker_ttft)) * NS)
        piece = self._piece(text)
        if calls and self.chat and _calls_out(trailer):
            piece["message"]["tool_calls"] = _calls_out(trailer)
        return {
            "model": self.model, "created_at": _now(), **piece, "done": True,
            "done_reason": "length" if trailer.get("finish_reason") == "length" else "stop",
            "total_duration": total, "load_duration": 0,
            "prompt_eval_count": int(usage.get("prompt_tokens") or 0),
            "prompt_eval_duration": prompt_ns,
            "eval_count": int(usage.get("completion_tokens") or 0),
            "eval_duration": eval_ns,
        }

    def done(self, trailer: dict[str, Any]) -> bytes:
        out = b""
        if self.chat and _calls_out(trailer):  # as Ollama streams them: before the end
            piece = self._piece("")
            piece["message"]["tool_calls"] = _calls_out(trailer)
            out = dumps({"model": self.model, "created_at": _now(), **piece,
                         "done": False}) + b"\n"
        return out + dumps(self.final(trailer, calls=False)) + b"\n"

    def error(self, err: P2PInferError) -> bytes:
        return dumps({"error": err.message}) + b"\n"


def _details(model: dict[str, Any]) -> dict[str, Any]:
    backend = str(model.get("backend") or "p2pinfer")
    return {"parent_model": "", "format": "gguf" if backend == "llamacpp" else backend,
            "family": backend, "families": [backend], "parameter_size": "",
            "quantization_level": ""}


def _capabilities(model: dict[str, Any]) -> list[str]:
    """What ``/api/show`` says a model can do, in Ollama's words."""
    can = model.get("capabilities") or ["chat"]
    return ((["completion"] if "chat" in can or "complete" in can else [])
            + (["tools"] if "tools" in can else [])
            + (["embedding"] if "embed" in can else []))


def _entry(model: dict[str, Any], name: str) -> dict[str, Any]:
    return {"name": name, "model": name, "modified_at": _modified(model), "size": 0,
            "digest": hashlib.sha256(name.encode()).hexdigest(), "details": _details(model)}


def ollama_routes(web: WebSite) -> list[Route]:
    """The Ollama routes of ``web``."""
    from .streaming import StreamResponse

    up = web.upstream

    async def find(request: Request, name: Any) -> dict[str, Any]:
        if not isinstance(name, str) or not name:
            raise _fail("model", "required")
        models = await up.catalog.models(credentials_from_headers(request.headers))
        names = model_names(models)
        for candidate in (name, name.removesuffix(":latest")):
            if candidate in names:
                return next(m for m in models if m.get("name") == names[candidate])
        raise UnknownModel(f"model {name[:128]!r} not found", data={"model": name[:128]})

    async def tags(request: Request) -> Response:
        models = await up.catalog.models(credentials_from_headers(request.headers))
        return JSONResponse({"models": [_entry(m, tag_name(str(m["name"]))) for m in models]})

    async def running(request: Request) -> Response:
        models = await up.catalog.models(credentials_from_headers(request.headers))
        expires = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=24))
        out = []
        for m in models:
            if m.get("status") == "loaded":
                entry = _entry(m, tag_name(str(m["name"])))
                entry.update(expires_at=expires.isoformat().replace("+00:00", "Z"),
                             size_vram=0, context_length=m.get("context_length"))
                out.append(entry)
        return JSONResponse({"models": out})

    async def show(request: Request) -> Response:
        body = await read_json(request)
        for key in body:
            if key not in ("model", "name", "verbose"):
                raise _fail(str(key)[:64], "unknown field")
        model = await find(request, body.get("model", body.get("name")))
        info: dict[str, Any] = {"general.architecture": "p2pinfer",
                                "general.name": model["name"]}
        if isinstance(model.get("context_length"), int):
            info["p2pinfer.context_length"] = model["context_length"]
        return JSONResponse({"modelfile": "", "parameters": "", "template": "",
                             "details": _details(model), "model_info": info,
                             "capabilities": _capabilities(model),
                             "modified_at": _modified(model)})

    async def version(request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def generate(request: Request, *, chat: bool) -> Response:
        auth = credentials_from_headers(request.headers)
        params, stream = ollama_request(await read_json(request), chat=chat)
        name = params["model"]
        dialect = OllamaDialect(name, chat=chat)
        if not chat and not params["prompt"]:
            await find(request, name)  # Ollama loads the model and answers at once
            return JSONResponse({"model": name, "created_at": _now(), "response": "",
                                 "done": True, "done_reason": "load"})
        params = await prepare_inference(web, params, auth)
        started = time.monotonic()
        call = await up.inference(params, auth, stream=stream)
        if stream:
            return StreamResponse(call, dialect)
        try:
            text = await call.collect()
        finally:
            await call.aclose()
        trailer = {"latency_ms": (time.monotonic() - started) * 1000, **call.trailer}
        return JSONResponse(dialect.final(trailer, text))

    async def chat(request: Request) -> Response:
        return await generate(request, chat=True)

    async def embed(request: Request) -> Response:
        """``/api/embed``: ``input`` a text or a list; ``embeddings`` back."""
        body = await read_json(request)
        for key in body:
            if key not in EMBED_KEYS:
                raise _fail(str(key)[:64], "unknown field")
        if body.get("truncate") is False:
            raise _fail("truncate", "texts longer than the model reads are always truncated")
        if body.get("dimensions") is not None:
            raise _fail("dimensions", "not supported: the model's vectors have a fixed size")
        started = time.monotonic()
        result = await up.embed({"input": body.get("input"), "model": body.get("model")},
                                credentials_from_headers(request.headers))
        return JSONResponse({
            "model": body.get("model"), "embeddings": result["embeddings"],
            "total_duration": int((time.monotonic() - started) * 1e9), "load_duration": 0,
            "prompt_eval_count": int(result["usage"].get("prompt_tokens") or 0)})

    async def embeddings(request: Request) -> Response:
        """``/api/embeddings`` (Ollama's older route): one ``prompt``."""
        body = await read_json(request)
        for key in body:
            if key not in ("model", "prompt", "options", "keep_alive"):
                raise _fail(str(key)[:64], "unknown field")
        result = await up.embed({"input": body.get("prompt"), "model": body.get("model")},
                                credentials_from_headers(request.headers))
        return JSONResponse({"embedding": result["embeddings"][0]})

    async def complete(request: Request) -> Response:
        return await generate(request, chat=False)

    return [
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", complete, methods=["POST"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/ps", running, methods=["GET"]),
        Route("/api/version", version, methods=["GET"]),
        Route("/api/embed", embed, methods=["POST"]),
        Route("/api/embeddings", embeddings, methods=["POST"]),
    ]
