"""Tool calls for any model, and the pieces backends share to read them.

**Any model, through a grammar.** Most small models' chat templates (the
embedded SmolLM2's included) know nothing of tools, and llama-server then
ignores ``tools`` altogether. For the llama.cpp backend a tool request is
therefore asked in one generic form that every model can follow: the tools
are described in the system message, earlier calls and their results are
written into the history as text, and the answer is constrained (a JSON
Schema, which llama-server turns into a grammar) to be exactly one of

- ``{"tool_calls": [{"name": "<a tool's name>", "arguments": {...}}, ...]}``,
  each call's arguments an instance of that tool's ``parameters`` schema;
- ``{"response": "<text>"}`` (only when ``tool_choice`` is ``auto``).

So a call always parses and names a real tool with valid arguments, however
small the model; ``required`` and a named tool leave only the first form,
``parallel_tool_calls: false`` allows one call. The price: the answer is
known only once it is complete, so a streamed answer arrives in one piece.

:class:`ToolCallDeltas` gathers OpenAI's streamed ``delta.tool_calls``
pieces (by ``index``) into whole calls, for backends that pass tools on.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from ..prompts import MAX_TOOL_CALLS, GenerationParams, Message, Tool, ToolCall

__all__ = ["ToolCallDeltas", "answer_schema", "call_id", "generic_messages", "parse_answer"]


def call_id() -> str:
    """A fresh id for a call the model made (OpenAI's ``call_...`` form)."""
    return f"call_{secrets.token_hex(12)}"


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.name},
            "arguments": tool.parameters or {"type": "object"},
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def answer_schema(params: GenerationParams) -> dict[str, Any]:
    """The JSON Schema an answer to ``params`` (which call tools) must match."""
    tools = [t for t in params.tools
             if params.forced_tool is None or t.name == params.forced_tool]
    calls: dict[str, Any] = {
        "type": "array",
        "items": _call_schema(tools[0]) if len(tools) == 1
        else {"anyOf": [_call_schema(t) for t in tools]},
        "minItems": 1,
        "maxItems": MAX_TOOL_CALLS if params.parallel_tool_calls else 1,
    }
    call_form = {"type": "object", "properties": {"tool_calls": calls},
                 "required": ["tool_calls"], "additionalProperties": False}
    if params.tool_choice != "auto":
        return call_form
    answer_form = {"type": "object", "properties": {"response": {"type": "string"}},
                   "required": ["response"], "additionalProperties": False}
    return {"anyOf": [call_form, answer_form]}


def _instructions(params: GenerationParams) -> str:
    tools = json.dumps([t.to_dict() for t in params.tools], ensure_ascii=False)
    text = ("You can call these tools (JSON Schema for their arguments):\n" + tools +
            "\n\nAnswer with JSON only. To call tools: "
            '{"tool_calls": [{"name": "<tool name>", "arguments": {...}}]}')
    if params.forced_tool is not None:
        return text + f". Call the tool {params.forced_tool} now."
    if params.tool_choice == "required":
        return text + ". Call at least one tool now."
    return (text + ". Whenever a tool can give or check what the user asks for, call it. "
            'Only when no tool applies, answer directly: {"response": "<your answer>"}.')


def generic_messages(messages: tuple[Message, ...],
                     params: GenerationParams) -> list[dict[str, Any]]:
    """The history in plain chat messages any template takes: tool calls
    become the JSON the model would have written, tool results a user
    message, and (when tools may be called) the tools are described in the
    system message."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            text = f"Result of tool call {m.tool_call_id}: {m.content}"
            if out and out[-1]["role"] == "user" and out[-1].get("_results"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_results": True})
        elif m.tool_calls:
            calls = [{"name": c.name, "arguments": c.parsed_arguments()} for c in m.tool_calls]
            out.append({"role": "assistant",
                        "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)})
        else:
            out.append({"role": m.role, "content": m.content})
    for item in out:
        item.pop("_results", None)
    if params.calls_tools:
        head = _instructions(params)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + head}
        else:
            out.insert(0, {"role": "system", "content": head})
    return out


def _load(text: str) -> Any:
    """The answer's JSON; for one cut short by ``max_tokens``, what of it is
    complete: the calls before the cut, or the response text up to it."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    end = text.rfind("}")
    while end > 0:
        try:
            return json.loads(text[:end + 1] + "]}")
        except ValueError:
            end = text.rfind("}", 0, end)
    for tail in ('"}', '\\"}'):  # a response cut mid-string (or mid-escape)
        try:
            return json.loads(text + tail)
        except ValueError:
            continue
    return None


def parse_answer(text: str) -> tuple[str, tuple[ToolCall, ...]]:
    """An answer in the generic form as (text, calls). A call repeated word
    for word is kept once (a small model may loop on it); anything that is
    not the generic form is returned as text, with no call."""
    value = _load(text)
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        calls: list[ToolCall] = []
        seen: set[tuple[str, str]] = set()
        for call in value["tool_calls"]:
            if isinstance(call, dict) and isinstance(call.get("name"), str):
                arguments = json.dumps(call.get("arguments", {}), ensure_ascii=False)
                if (call["name"], arguments) not in seen:
                    seen.add((call["name"], arguments))
                    calls.append(ToolCall(call_id(), call["name"], arguments))
        if calls:
            return "", tuple(calls)
    if isinstance(value, dict) and isinstance(value.get("response"), str):
        return value["response"], ()
    return text, ()


class ToolCallDeltas:
    """Sans-IO: OpenAI's streamed ``delta.tool_calls`` pieces, by ``index``,
    into whole calls (the id and name come once, the arguments in parts)."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def feed(self, pieces: Any) -> None:
        if not isinstance(pieces, list):
            return
        for n, piece in enumerate(pieces):
            if not isinstance(piece, dict):
                continue
            index = piece.get("index", n)
            call = self._calls.setdefault(index if type(index) is int else n,
                                          {"id": "", "name": "", "arguments": ""})
            if isinstance(piece.get("id"), str):
                call["id"] = piece["id"]
            function = piece.get("function")
            if isinstance(function, dict):
                if isinstance(function.get("name"), str):
                    call["name"] += function["name"]
                arguments = function.get("arguments")
                if isinstance(arguments, str):
                    call["arguments"] += arguments
                elif isinstance(arguments, dict):  # a whole object (Ollama's way)
                    call["arguments"] = json.dumps(arguments, ensure_ascii=False)

    def calls(self) -> tuple[ToolCall, ...]:
        return tuple(ToolCall(c["id"] or call_id(), c["name"], c["arguments"] or "{}")
                     for _, c in sorted(self._calls.items()) if c["name"])
