"""OpenAI's Responses API (``POST /v1/responses``) over the prompt contract.

Newer OpenAI tooling (the ``openai`` package's ``client.responses``, agent
SDKs, LangChain's ``use_responses_api``) speaks it instead of chat
completions. A request becomes p2pinfer prompt parameters:

- ``input`` (a text, or a list of items: messages with text content,
  ``function_call`` items the model made and ``function_call_output``
  items answering them) and ``instructions`` (a system message first);
- ``max_output_tokens``, ``temperature``, ``top_p``;
- ``tools`` (function tools, ``{type: "function", name, description,
  parameters, strict}``), ``tool_choice``, ``parallel_tool_calls``;
- ``text.format``: ``text``, ``json_object`` or ``json_schema`` (as
  ``response_format`` in chat completions).

The answer is a ``response`` object whose ``output`` holds a ``message``
item (``output_text``) and a ``function_call`` item per tool call; streamed,
it comes as the semantic events OpenAI sends (``response.created``,
``response.output_text.delta``, ..., ``response.completed``), each with a
``sequence_number``.

p2pinfer keeps no responses: ``store`` is accepted and nothing is stored,
so ``previous_response_id`` is refused (send the whole conversation in
``input``), and built-in tools (web search, files, ...) are refused.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from ..errors import InvalidParams, P2PInferError
from .responses import openai_error_body

__all__ = ["ResponsesDialect", "response_object", "responses_request"]

KNOWN = frozenset({"model", "input", "instructions", "max_output_tokens", "temperature",
                   "top_p", "stream", "tools", "tool_choice", "parallel_tool_calls", "text",
                   "store", "metadata", "user", "previous_response_id", "truncation",
                   "service_tier", "include", "reasoning", "stream_options",
                   "safety_identifier", "prompt_cache_key"})
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _fail(field: str, problem: str) -> InvalidParams:
    return InvalidParams(f"{field}: {problem}", data={"field": field})


def _text(content: Any, field: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in (
                    "input_text", "output_text", "text") or not isinstance(part.get("text"), str):
                raise _fail(f"{field}[{i}]", "only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise _fail(field, "must be a string or a list of text parts")


def _messages(value: Any, instructions: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _fail("instructions", "must be a string")
        out.append({"role": "system", "content": instructions})
    if isinstance(value, str):
        return [*out, {"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _fail("input", "must be a string or a non-empty list of items")
    for i, item in enumerate(value):
        field = f"input[{i}]"
        if not isinstance(item, dict):
            raise _fail(field, "must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise _fail(f"{field}.role", "must be system, developer, user or assistant")
            out.append({"role": ROLES[role], "content": _text(item.get("content"),
                                                              f"{field}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "name": item.get("name"),
                    "arguments": item.get("arguments", "{}")}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # calls made together
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, str)
                        else _text(output, f"{field}.output")})
        else:
            raise _fail(f"{field}.type", "must be message, function_call or "
                        f"function_call_output, got {str(kind)[:32]!r}")
    return out


def _tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _fail("tools", "must be a list of function tools")
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _fail(f"tools[{i}]", "only function tools are supported")
        for key in tool:
            if key not in ("type", "name", "description", "parameters", "strict"):
                raise _fail(f"tools[{i}].{str(key)[:32]}", "not supported")
        out.append({k: tool[k] for k in ("name", "description", "parameters")
                    if tool.get(k) is not None})
    return out


def _tool_choice(value: Any) -> Any:
    if isinstance(value, dict):
        if value.get("type") != "function" or set(value) != {"type", "name"}:
            raise _fail("tool_choice", 'must be "auto", "none", "required" or '
                        "{type: function, name}")
        return {"name": value["name"]}
    return value


def _format(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"format", "verbosity"}:
        raise _fail("text", "only text.format is supported")
    fmt = value.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _fail("text.format", "must be an object with a type")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind != "json_schema":
        raise _fail("text.format.type", "must be text, json_object or json_schema")
    for key in fmt:
        if key not in ("type", "name", "schema", "strict", "description"):
            raise _fail(f"text.format.{str(key)[:32]}", "not supported")
    out: dict[str, Any] = {"type": "json_schema", "schema": fmt.get("schema")}
    for key in ("name", "strict"):
        if fmt.get(key) is not None:
            out[key] = fmt[key]
    return out


def responses_request(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A Responses API body → (p2pinfer request, stream)."""
    for key in body:
        if key not in KNOWN:
            raise _fail(str(key)[:64], "unrecognized request argument")
    if body.get("previous_response_id") is not None:
        raise _fail("previous_response_id", "p2pinfer stores no responses: send the whole "
                    "conversation in input")
    params: dict[str, Any] = {"messages": _messages(body.get("input"),
                                                    body.get("instructions"))}
    if body.get("model") is not None:
        params["model"] = body["model"]
    if body.get("max_output_tokens") is not None:
        params["max_tokens"] = body["max_output_tokens"]
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            params[key] = body[key]
    if body.get("tools"):
        params["tools"] = _tools(body["tools"])
        for key in ("tool_choice", "parallel_tool_calls"):
            if body.get(key) is not None:
                params[key] = _tool_choice(body[key]) if key == "tool_choice" else body[key]
    fmt = _format(body.get("text"))
    if fmt is not None:
        params["format"] = fmt
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _fail("stream", "must be true or false")
    return params, stream


def _usage(trailer: dict[str, Any]) -> dict[str, Any]:
    raw = trailer.get("usage")
    usage: dict[str, Any] = raw if isinstance(raw, dict) else {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": content if status == "completed" or text else []}


def _call_items(trailer: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "function_call", "id": f"fc_{secrets.token_hex(12)}", "call_id": c["id"],
             "name": c["name"], "arguments": c["arguments"], "status": "completed"}
            for c in trailer.get("tool_calls") or []]


def response_object(ident: str, model: str, created: int, body: dict[str, Any], *,
                    status: str = "completed", output: list[dict[str, Any]] | None = None,
                    trailer: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``response`` object (``output`` and usage from a finished answer)."""
    trailer = trailer or {}
    cut = trailer.get("finish_reason") == "length"
    if status == "completed" and cut:
        status = "incomplete"
    return {
        "id": ident, "object": "response", "created_at": created, "status": status,
        "model": str(trailer.get("model") or model), "output": output or [],
        "usage": _usage(trailer) if trailer else None, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"), "top_p": body.get("top_p"),
        "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice") or "auto",
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "text": body.get("text") or {"format": {"type": "text"}},
        "metadata": body.get("metadata") or {}, "store": False,
        "previous_response_id": None, "reasoning": None, "truncation": "disabled",
    }


def whole_response(body: dict[str, Any], model: str, text: str,
                   trailer: dict[str, Any]) -> dict[str, Any]:
    """The answer to a non-streamed request."""
    output = [_message_item(f"msg_{secrets.token_hex(12)}", text, "completed")] \
        if text or not trailer.get("tool_calls") else []
    return response_object(f"resp_{secrets.token_hex(12)}", model, int(time.time()), body,
                           output=output + _call_items(trailer), trailer=trailer)


class ResponsesDialect:
    """The streamed Responses API: server-sent semantic events."""

    media_type = "text/event-stream"

    def __init__(self, body: dict[str, Any], model: str) -> None:
        self.body = body
        self.model = model
        self.ident = f"resp_{secrets.token_hex(12)}"
        self.item = f"msg_{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.seq = 0
        self.text: list[str] = []

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return (f"event: {kind}\ndata: ".encode() + json.dumps(data).encode() + b"\n\n")

    def _response(self, status: str, **kw: Any) -> dict[str, Any]:
        return response_object(self.ident, self.model, self.created, self.body,
                               status=status, **kw)

    def start(self) -> bytes:
        return (self._event("response.created", response=self._response("in_progress"))
                + self._event("response.in_progress", response=self._response("in_progress")))

    def delta(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> bytes:
        out = b""
        if not self.text:  # the message item opens with its first text
            out += self._event("response.output_item.added", output_index=0,
                               item=_message_item(self.item, "", "in_progress"))
            out += self._event("response.content_part.added", item_id=self.item,
                               output_index=0, content_index=0,
                               part={"type": "output_text", "text": "", "annotations": []})
        self.text.append(text)
        return out + self._event("response.output_text.delta", item_id=self.item,
                                 output_index=0, content_index=0, delta=text, logprobs=[])

    def done(self, trailer: dict[str, Any]) -> bytes:
        out = b""
        output: list[dict[str, Any]] = []
        if self.text:
            text = "".join(self.text)
            item = _message_item(self.item, text, "completed")
            out += self._event("response.output_text.done", item_id=self.item,
                               output_index=0, content_index=0, text=text, logprobs=[])
            out += self._event("response.content_part.done", item_id=self.item,
                               output_index=0, content_index=0, part=item["content"][0])
            out += self._event("response.output_item.done", output_index=0, item=item)
            output.append(item)
        for call in _call_items(trailer):
            index = len(output)
            out += self._event("response.output_item.added", output_index=index,
                               item={**call, "arguments": "", "status": "in_progress"})
            out += self._event("response.function_call_arguments.done", item_id=call["id"],
                               output_index=index, arguments=call["arguments"])
            out += self._event("response.output_item.done", output_index=index, item=call)
            output.append(call)
        response = self._response("completed", output=output, trailer=trailer)
        kind = "response.incomplete" if response["status"] == "incomplete" \
            else "response.completed"
        return out + self._event(kind, response=response)

    def error(self, err: P2PInferError) -> bytes:
        body = openai_error_body(err)["error"]
        return self._event("error", code=body.get("code"), message=body.get("message"),
                           param=body.get("param"))
