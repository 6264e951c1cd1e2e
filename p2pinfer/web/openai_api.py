"""The OpenAI-compatible API, so OpenAI clients can use the swarm unchanged.

Authenticated with ``Authorization: Bearer <API key>`` (a session token
works too). Errors are OpenAI-shaped: ``{"error": {"message", "type",
"param", "code"}}``; a request the server cannot accept is 400.

- ``GET /v1/models``, ``GET /v1/models/{model}``: the swarm's models.
- ``POST /v1/chat/completions``: ``messages`` (text content, or text
  parts), ``model``, ``max_tokens`` / ``max_completion_tokens``,
  ``temperature``, ``top_p``, ``stop``, ``seed``, ``n`` (up to 8 choices,
  without ``stream``: each is a request of its own, run at once and counted
  against the limits; with a seed, choice i uses seed + i; usage is the sum),
  ``stream`` with ``stream_options.include_usage`` (a last chunk with
  ``choices: []`` and ``usage``), then ``data: [DONE]``.
- ``POST /v1/completions``: ``prompt`` (a string, or a list of one)
  with the same options. The prompt is continued as it is, without the
  model's chat template ("The capital of France is" gets " Paris...").

``response_format``: ``text``, ``json_object`` (any JSON object) or
``json_schema`` (``{name, schema, strict}``): the model's answer is
constrained to it (a grammar on llama.cpp, so it always parses; passed on
to OpenAI-compatible and Ollama servers). A model that cannot is refused
with 400, ``code: "missing_capability"``.

Parameters that change nothing here (``user``, ``frequency_penalty`` and
``presence_penalty`` at 0, ``logprobs: false``, ...) are accepted and
ignored; tools, ``n`` over 8 (or over 1 with ``stream``) or logprobs are
refused with 400 rather than silently ignored.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import InvalidParams, P2PInferError, UnknownModel
from ..prompts import MAX_SEED
from .api import prepare_inference
from .credentials import credentials_from_headers
from .inputs import read_json
from .responses import dumps, openai_error_body
from .upstream import model_names

if TYPE_CHECKING:  # pragma: no cover
    from .site import WebSite

__all__ = ["ChatDialect", "CompletionDialect", "chat_request", "completion_request",
           "openai_routes"]

# Choices per request (n): each is a request of its own through the gateway,
# run at once, and counts against the user's limits as one.
MAX_CHOICES = 8
SAMPLING = ("model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
            "seed", "n", "stream", "stream_options")
# Accepted and ignored when they ask for nothing we would do differently.
IGNORED = ("user", "store", "metadata", "service_tier",
           "reasoning_effort", "modalities", "prediction", "logit_bias")
ZERO_OK = ("frequency_penalty", "presence_penalty")
FALSY_OK = ("logprobs", "top_logprobs", "functions", "echo", "suffix")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool"}


def _fail(field: str, problem: str) -> InvalidParams:
    return InvalidParams(f"{field}: {problem}", data={"field": field})


def _common(body: dict[str, Any], extra: tuple[str, ...]) -> tuple[dict[str, Any], bool, bool]:
    """The p2pinfer params from the sampling fields; (params, stream, include_usage)."""
    known = {*SAMPLING, *IGNORED, *ZERO_OK, *FALSY_OK, "best_of", *extra}
    for key in body:
        if key not in known:
            raise _fail(str(key)[:64], "unrecognized request argument")
    for key in ZERO_OK:
        if body.get(key) not in (None, 0, 0.0):
            raise _fail(key, "only 0 is supported")
    for key in FALSY_OK:
        if key not in extra and body.get(key) not in (None, False, [], ""):
            raise _fail(key, "not supported")
    if body.get("best_of") not in (None, 1):
        raise _fail("best_of", "only 1 is supported")
    fmt = _response_format(body.get("response_format"))
    n = body.get("n")
    if n is not None and (type(n) is not int or not 1 <= n <= MAX_CHOICES):
        raise _fail("n", f"must be an integer from 1 to {MAX_CHOICES}")
    params: dict[str, Any] = {}
    if body.get("model") is not None:
        params["model"] = body["model"]
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise _fail("max_tokens", "give max_tokens or max_completion_tokens, not both")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        params["max_tokens"] = limit
    for key in ("temperature", "top_p", "stop", "seed"):
        if body.get(key) is not None:
            params[key] = body[key]
    if fmt is not None:
        params["format"] = fmt
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _fail("stream", "must be true or false")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage",
                                                             "include_obfuscation"}:
            raise _fail("stream_options", "only include_usage is supported")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _fail("stream_options.include_usage", "must be true or false")
    return params, stream, include_usage


def _response_format(value: Any) -> Any:
    """OpenAI's ``response_format`` as p2pinfer's ``format`` (None: text)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail("response_format", "must be an object with a type")
    kind = value.get("type")
    if kind == "text" and set(value) == {"type"}:
        return None
    if kind == "json_object" and set(value) == {"type"}:
        return "json"
    if kind != "json_schema":
        raise _fail("response_format.type", "must be text, json_object or json_schema")
    spec = value.get("json_schema")
    if set(value) != {"type", "json_schema"} or not isinstance(spec, dict):
        raise _fail("response_format.json_schema", "is required: {name, schema, strict}")
    for key in spec:
        if key not in ("name", "schema", "strict", "description"):
            raise _fail(f"response_format.json_schema.{str(key)[:32]}", "not supported")
    out: dict[str, Any] = {"type": "json_schema",
                           "schema": spec.get("schema", {"type": "object"})}
    for key in ("name", "strict"):
        if spec.get(key) is not None:
            out[key] = spec[key]
    return out


def _content(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise _fail(f"{field}[{i}]", "only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise _fail(field, "must be a string or a list of text parts")


def openai_tools(value: Any) -> list[dict[str, Any]]:
    """OpenAI's ``tools`` ({type: function, function: {...}}) as p2pinfer's."""
    if not isinstance(value, list):
        raise _fail("tools", "must be a list of {type: function, function: {...}}")
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") != "function" or \
                not isinstance(tool.get("function"), dict) or set(tool) - {"type", "function"}:
            raise _fail(f"tools[{i}]", "only {type: function, function: {...}} is supported")
        spec = tool["function"]
        for key in spec:
            if key not in ("name", "description", "parameters", "strict"):
                raise _fail(f"tools[{i}].function.{str(key)[:32]}", "not supported")
        # strict: the arguments always match the schema here anyway
        out.append({k: spec[k] for k in ("name", "description", "parameters") if k in spec})
    return out


def _tool_choice(value: Any) -> Any:
    if isinstance(value, dict):
        function = value.get("function")
        if value.get("type") != "function" or not isinstance(function, dict) or \
                set(function) != {"name"}:
            raise _fail("tool_choice", 'must be "auto", "none", "required" or '
                        '{type: function, function: {name}}')
        return {"name": function["name"]}
    return value


def _tool_calls(value: Any, field: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls`` as p2pinfer's {id, name, arguments}."""
    if not isinstance(value, list):
        raise _fail(field, "must be a list")
    out = []
    for i, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise _fail(f"{field}[{i}]", "must be {id, type: function, function: "
                        "{name, arguments}}")
        out.append({"id": call.get("id"), "name": function.get("name"),
                    "arguments": function.get("arguments", "{}")})
    return out


def chat_request(body: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
    """A chat completion body → (p2pinfer request, stream, include_usage)."""
    params, stream, include_usage = _common(
        body, ("messages", "response_format", "tools", "tool_choice", "parallel_tool_calls",
               "logprobs", "top_logprobs"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _fail("messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _fail(f"messages[{i}]", "must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise _fail(f"messages[{i}].role",
                        "must be system, developer, user, assistant or tool")
        for key in m:
            if key not in ("role", "content", "name", "refusal", "tool_calls",
                           "tool_call_id"):
                raise _fail(f"messages[{i}].{str(key)[:32]}", "not supported")
        message: dict[str, Any] = {"role": ROLES[role]}
        if m.get("tool_calls"):
            message["tool_calls"] = _tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
        if m.get("content") is not None or "tool_calls" not in message:
            message["content"] = _content(m.get("content"), f"messages[{i}].content")
        if "tool_call_id" in m:
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    params["messages"] = out
    if body.get("tools"):
        params["tools"] = openai_tools(body["tools"])
    for key in ("tool_choice", "parallel_tool_calls"):
        if body.get(key) is not None and body.get("tools"):
            params[key] = _tool_choice(body[key]) if key == "tool_choice" else body[key]
    for key in ("logprobs", "top_logprobs"):
        if body.get(key) not in (None, False):  # logprobs: false asks for nothing
            params[key] = body[key]
    return params, stream, include_usage


def completion_request(body: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
    """A (legacy) completion body → (p2pinfer request, stream, include_usage)."""
    params, stream, include_usage = _common(body, ("prompt",))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _fail("prompt", "must be a string (or a list of one string)")
    params["prompt"] = prompt
    params["raw"] = True  # continued as it is, as OpenAI's completions do
    return params, stream, include_usage


def _finish(reason: Any) -> str:
    return reason if reason in ("length", "tool_calls") else "stop"


def openai_tool_calls(trailer: dict[str, Any], *, indexed: bool = False
                      ) -> list[dict[str, Any]]:
    """The calls an answer made, in OpenAI's shape (with ``index`` for a
    streamed delta)."""
    calls = trailer.get("tool_calls") or []
    return [{**({"index": i} if indexed else {}), "id": c["id"], "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}}
            for i, c in enumerate(calls)]


def _usage(trailer: dict[str, Any]) -> dict[str, int]:
    raw = trailer.get("usage")
    usage: dict[str, Any] = raw if isinstance(raw, dict) else {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": int(usage.get("total_tokens") or prompt + completion)}


def _sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


class _SseDialect:
    media_type = "text/event-stream"
    object_name = ""

    def __init__(self, ident: str, model: str, include_usage: bool) -> None:
        self.ident = ident
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj: dict[str, Any] = {"id": self.ident, "object": self.object_name,
                               "created": self.created, "model": self.model,
                               "choices": choices, **extra}
        if self.include_usage and "usage" not in obj:
            obj["usage"] = None
        return _sse(obj)

    def choice(self, text: str, finish: str | None,
               logprobs: list[dict[str, Any]] | None = None, index: int = 0) -> dict[str, Any]:
        raise NotImplementedError

    def start(self, index: int = 0) -> bytes:
        return b""

    def delta(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> bytes:
        return self.chunk([self.choice(text, None, logprobs)])

    def done(self, trailer: dict[str, Any]) -> bytes:
        if trailer.get("model"):
            self.model = str(trailer["model"])
        out = self.calls(trailer)
        out += self.chunk([self.choice("", _finish(trailer.get("finish_reason")))])
        if self.include_usage:
            out += self.chunk([], usage=_usage(trailer))
        return out + b"data: [DONE]\n\n"

    def calls(self, trailer: dict[str, Any], index: int = 0) -> bytes:
        return b""

    # several choices streamed at once (n > 1), each chunk naming its index
    def start_many(self, n: int) -> bytes:
        return b"".join(self.start(i) for i in range(n))

    def delta_at(self, index: int, text: str,
                 logprobs: list[dict[str, Any]] | None = None) -> bytes:
        return self.chunk([self.choice(text, None, logprobs, index)])

    def done_many(self, trailers: list[dict[str, Any]]) -> bytes:
        if trailers and trailers[0].get("model"):
            self.model = str(trailers[0]["model"])
        out = b""
        for index, trailer in enumerate(trailers):
            out += self.calls(trailer, index)
            out += self.chunk([self.choice("", _finish(trailer.get("finish_reason")),
                                           None, index)])
        if self.include_usage:  # every choice's tokens: each ran on its own
            usage = [_usage(t) for t in trailers]
            out += self.chunk([], usage={k: sum(u[k] for u in usage) for k in usage[0]})
        return out + b"data: [DONE]\n\n"

    def error(self, err: P2PInferError) -> bytes:
        return _sse(openai_error_body(err))


class ChatDialect(_SseDialect):
    """``chat.completion.chunk`` events."""

    object_name = "chat.completion.chunk"

    def choice(self, text: str, finish: str | None,
               logprobs: list[dict[str, Any]] | None = None, index: int = 0) -> dict[str, Any]:
        delta = {"content": text} if finish is None else {}
        scores = {"content": logprobs, "refusal": None} if logprobs else None
        return {"index": index, "delta": delta, "logprobs": scores, "finish_reason": finish}

    def start(self, index: int = 0) -> bytes:
        return self.chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None}])

    def calls(self, trailer: dict[str, Any], index: int = 0) -> bytes:
        """The calls, each whole in one delta (clients join deltas by index)."""
        calls = openai_tool_calls(trailer, indexed=True)
        if not calls:
            return b""
        return self.chunk([{"index": index, "delta": {"tool_calls": calls}, "logprobs": None,
                            "finish_reason": None}])


class CompletionDialect(_SseDialect):
    """``text_completion`` events."""

    object_name = "text_completion"

    def choice(self, text: str, finish: str | None,
               logprobs: list[dict[str, Any]] | None = None, index: int = 0) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def embedding_request(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """An embeddings body → (p2pinfer request, encoding_format)."""
    for key in body:
        if key not in ("input", "model", "encoding_format", "dimensions", "user"):
            raise _fail(str(key)[:64], "unrecognized request argument")
    value = body.get("input")
    items = value if isinstance(value, list) else [value]
    if any(isinstance(item, list) or isinstance(item, int) for item in items):
        raise _fail("input", "token arrays are not supported: send text")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise _fail("encoding_format", "must be float or base64")
    if body.get("dimensions") is not None:
        raise _fail("dimensions", "not supported: the model's vectors have a fixed size")
    request: dict[str, Any] = {"input": value}
    if body.get("model") is not None:
        request["model"] = body["model"]
    return request, encoding


def _vector(values: list[float], encoding: str) -> Any:
    """One embedding as OpenAI sends it: floats, or base64 of little-endian
    float32 (what the openai package asks for by default)."""
    if encoding == "float":
        return values
    import base64
    import struct

    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def _choice_params(params: dict[str, Any], index: int) -> dict[str, Any]:
    """Choice ``index`` of n: with a seed, seed + index, so that the choices
    are reproducible, not identical."""
    if index and isinstance(params.get("seed"), int):
        return {**params, "seed": (params["seed"] + index) % (MAX_SEED + 1)}
    return params


def _model_object(model: dict[str, Any]) -> dict[str, Any]:
    # created: the model file's time on its worker (the earliest of its
    # workers'), or when the worker first served it
    created = model.get("created")
    return {"id": str(model["name"]), "object": "model",
            "created": created if isinstance(created, int) else 0, "owned_by": "p2pinfer"}


def openai_routes(web: WebSite) -> list[Route]:
    """The ``/v1`` routes of ``web``."""
    from .streaming import MultiStreamResponse, StreamResponse

    up = web.upstream

    async def list_models(request: Request) -> Response:
        models = await up.catalog.models(credentials_from_headers(request.headers))
        return JSONResponse({"object": "list",
                             "data": [_model_object(m) for m in models]})

    async def get_model(request: Request) -> Response:
        wanted = request.path_params["model"]
        models = await up.catalog.models(credentials_from_headers(request.headers))
        names = model_names(models)
        if wanted not in names:
            raise UnknownModel(f"model {wanted[:128]!r} is not served in the swarm",
                               data={"model": wanted[:128]})
        (model,) = [m for m in models if m.get("name") == names[wanted]]
        return JSONResponse({**_model_object(model), "id": wanted})  # an alias is its own id

    async def complete(request: Request, *, chat: bool) -> Response:
        auth = credentials_from_headers(request.headers)
        body = await read_json(request)
        params, stream, include_usage = (chat_request if chat else completion_request)(body)
        params = await prepare_inference(web, params, auth)
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        requested = str(params.get("model") or body.get("model") or "default")
        dialect = (ChatDialect if chat else CompletionDialect)(ident, requested, include_usage)
        choices_n = int(body.get("n") or 1)
        if stream and choices_n == 1:
            call = await up.inference(params, auth, stream=stream)
            return StreamResponse(call, dialect)
        if stream:  # n choices streamed at once, each chunk naming its index
            calls: list[Any] = []
            try:
                for index in range(choices_n):
                    calls.append(await up.inference(_choice_params(params, index), auth))
            except BaseException:
                with anyio.CancelScope(shield=True):
                    for opened in calls:
                        await opened.aclose()
                raise
            return MultiStreamResponse(calls, dialect)
        answers: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = \
            [("", {}, [])] * int(body.get("n") or 1)

        async def answer(index: int) -> None:
            call = await up.inference(_choice_params(params, index), auth, stream=False)
            try:
                answers[index] = (await call.collect(), call.trailer, call.logprobs)
            finally:
                await call.aclose()

        try:
            if len(answers) == 1:
                await answer(0)
            else:
                async with anyio.create_task_group() as tasks:  # n choices: n requests at once
                    for index in range(len(answers)):
                        tasks.start_soon(answer, index)
        except BaseExceptionGroup as group:  # the first choice's error is the answer
            failed = group.subgroup(lambda e: isinstance(e, P2PInferError))
            if failed is None:
                raise
            while isinstance(failed, BaseExceptionGroup):
                failed = failed.exceptions[0]
            raise failed from None
        choices: list[dict[str, Any]] = []
        for index, (text, trailer, scores) in enumerate(answers):
            finish = _finish(trailer.get("finish_reason"))
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            calls = openai_tool_calls(trailer)
            if calls:
                message["tool_calls"] = calls
                message["content"] = text or None
            choices.append(
                {"index": index, "message": message,
                 "logprobs": {"content": scores, "refusal": None} if params.get("logprobs")
                 else None, "finish_reason": finish} if chat else
                {"index": index, "text": text, "logprobs": None, "finish_reason": finish})
        first = answers[0][1]
        usage = _usage(first)
        for _, trailer, _ in answers[1:]:  # every choice's tokens: each ran on its own
            more = _usage(trailer)
            usage = {k: usage[k] + more[k] for k in usage}
        return JSONResponse({
            "id": ident, "object": "chat.completion" if chat else "text_completion",
            "created": dialect.created, "model": str(first.get("model") or requested),
            "choices": choices, "usage": usage, "system_fingerprint": None,
        }, headers={"X-Request-Id": ",".join(str(t.get("request_id") or "")
                                             for _, t, _ in answers)})

    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    async def responses(request: Request) -> Response:
        from .openai_responses import ResponsesDialect, responses_request, whole_response

        auth = credentials_from_headers(request.headers)
        body = await read_json(request)
        params, stream = responses_request(body)
        params = await prepare_inference(web, params, auth)
        model = str(params.get("model") or body.get("model") or "default")
        call = await up.inference(params, auth, stream=stream)
        if stream:
            return StreamResponse(call, ResponsesDialect(body, model))
        try:
            text = await call.collect()
        finally:
            await call.aclose()
        return JSONResponse(whole_response(body, model, text, call.trailer),
                            headers={"X-Request-Id": str(call.trailer.get("request_id") or "")})

    async def embeddings(request: Request) -> Response:
        auth = credentials_from_headers(request.headers)
        params, encoding = embedding_request(await read_json(request))
        result = await up.embed(params, auth)
        return JSONResponse({
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": _vector(v, encoding)}
                     for i, v in enumerate(result["embeddings"])],
            "model": result["model"],
            "usage": {"prompt_tokens": int(result["usage"].get("prompt_tokens") or 0),
                      "total_tokens": int(result["usage"].get("total_tokens") or 0)},
        }, headers={"X-Request-Id": str(result.get("request_id") or "")})

    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
    ]
