"""The prompt contract shared by the roles: chat messages, sampling
parameters, and the validation of ``processPrompt`` parameters (pure
functions, no I/O). The gateway and the web role check a user's request
with it before it travels; the inference role checks it again on arrival.

Accepted shape (a msgpack map; every field is checked and an error names it)::

    {
      "prompt": "text",              # or "messages", not both
      "system": "text",              # optional, only with "prompt"
      "messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "text"}, ...],
                                     # an assistant message may carry "tool_calls":
                                     #     [{"id", "name", "arguments": "<JSON text>"}];
                                     # a tool message answers one: "tool_call_id"
      "model": "smollm2",            # optional: the node's default model
      "max_tokens": 256,             # 1 .. [inference] max_tokens_limit   (alias maxTokens)
      "temperature": 0.7,            # 0 .. 2
      "top_p": 0.95,                 # (0, 1]                              (alias topP)
      "stop": ["\\n\\n"],              # a string or up to 4 strings of 1..64 chars
      "seed": 42,                    # 0 .. 2**32-1
      "cache": true,                 # false skips the response cache
      "stream": true,                # false: the whole answer as one chunk
      "format": "json",              # or {"type": "json_schema", "schema": {...},
                                     #     "name": "x", "strict": true}: see OutputFormat
      "raw": false,                  # true: continue "prompt" as it is (no chat
                                     #     template; not with system or messages)
      "tools": [{"name": "get_weather", "description": "...",
                 "parameters": {...}}],   # functions the model may call (at most 32)
      "tool_choice": "auto",         # "none", "required" or {"name": "get_weather"}
      "parallel_tool_calls": true,   # false: at most one call per answer
      "logprobs": false,             # true: each chunk carries its tokens' log probabilities
      "top_logprobs": 0,             # 0..20 most likely alternatives per token (with logprobs)
      "modelConfig": {...}           # the original API's form: model, max_tokens,
    }                                # temperature, top_p, stop, seed may go here instead

A bare string is taken as ``{"prompt": <string>}``. Unknown keys are
rejected, so a typo (``temprature``) is an error rather than a silent default.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, NoReturn

import jsonschema
import jsonschema.exceptions

from .errors import InvalidParams, MissingCapability

__all__ = ["CAPABILITIES", "ROLES", "EmbedRequest", "GenerationParams", "Message",
           "OutputFormat",
           "ParamLimits", "PromptRequest", "Tool", "ToolCall", "missing_capability",
           "parse_embed_params", "parse_model_name", "parse_prompt_params",
           "parse_tool_calls", "requested_model", "token_logprobs"]

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
MAX_SEED = 2**32 - 1
MAX_SCHEMA_BYTES = 16_384  # a JSON schema, as compact JSON
SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

ROLES = ("system", "user", "assistant", "tool")
MAX_TOOLS = 32
MAX_TOOL_CALLS = 16  # calls in one assistant message
MAX_DESCRIPTION = 1024
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOOL_CALL_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
TOOL_CHOICES = ("auto", "none", "required")

# What a model may be able to do, as workers announce it per model
# (``capabilities`` in their descriptors) and requests need it.
CAPABILITIES = {
    "chat": "chat completions",
    "json": "JSON output (response_format json_object or json_schema; Ollama's format)",
    "complete": "raw completion (a prompt continued as it is, without the chat template)",
    "tools": "tool calls (tools and tool_choice)",
    "embed": "embeddings (a vector for each input text)",
    "logprobs": "token log probabilities (logprobs)",
}
MAX_TOP_LOGPROBS = 20
MAX_EMBED_INPUTS = 256
MAX_EMBED_CHARS = 32_000  # one text; a model reads at most its max_length tokens of it


def missing_capability(model: str, capability: str) -> MissingCapability:
    """The error for a request ``model`` cannot serve, naming what it lacks."""
    what = CAPABILITIES.get(capability, capability)
    return MissingCapability(f"model {model!r} cannot do {what}",
                             data={"capability": capability, "model": model})


@dataclass(frozen=True)
class ToolCall:
    """A call of one of the request's tools, as the model made it.
    ``arguments`` is JSON text (an object), as OpenAI sends it."""

    id: str
    name: str
    arguments: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}

    def parsed_arguments(self) -> Any:
        """The arguments as a value ({} when they are not JSON)."""
        try:
            return json.loads(self.arguments)
        except ValueError:
            return {}


@dataclass(frozen=True)
class Tool:
    """A function the model may call; ``parameters`` is a JSON Schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None

    def __hash__(self) -> int:  # the schema is a dict
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        if self.parameters is not None:
            out["parameters"] = self.parameters
        return out

    def to_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": self.to_dict()}


@dataclass(frozen=True)
class Message:
    """One chat message. ``role`` is ``system``, ``user``, ``assistant`` or
    ``tool``; an assistant message may carry the ``tool_calls`` it made, and
    a tool message answers the call ``tool_call_id``."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The message in OpenAI's chat shape (what backends are sent)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def to_wire(self) -> dict[str, Any]:
        """The message as ``processPrompt`` takes it."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True)
class OutputFormat:
    """The answer must be JSON: any JSON object (``schema`` None), or an
    instance of ``schema`` (a JSON Schema, checked with :mod:`jsonschema`).

    Backends that can constrain decoding do (llama.cpp turns the schema into
    a grammar, so the answer always parses); the others pass it on to their
    server. ``name`` and ``strict`` are OpenAI's and travel with it.

    On the wire: ``"json"``, ``{"type": "json"}``, or ``{"type":
    "json_schema", "schema": {...}, "name": "answer", "strict": true}``.
    """

    schema: dict[str, Any] | None = None
    name: str = "answer"
    strict: bool = False

    def __hash__(self) -> int:  # the schema is a dict
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        if self.schema is None:
            return {"type": "json"}
        return {"type": "json_schema", "schema": self.schema, "name": self.name,
                "strict": self.strict}

    def check(self, text: str) -> Any:
        """The answer ``text`` parsed, or ValueError saying why it does not
        conform (not JSON, not an object, or not an instance of the schema)."""
        value = json.loads(text)
        if self.schema is None:
            if not isinstance(value, dict):
                raise ValueError("the answer is JSON but not an object")
            return value
        try:
            jsonschema.validate(value, self.schema)
        except jsonschema.exceptions.ValidationError as exc:
            raise ValueError(f"the answer does not match the schema: {exc.message}") from None
        return value


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters, already validated (see :func:`parse_prompt_params`)."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    seed: int | None = None
    format: OutputFormat | None = None
    # the one user message is the text to continue, without the chat template
    raw: bool = False
    tools: tuple[Tool, ...] = ()
    # "auto", "none", "required", or the name of the one tool to call
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True
    # each generated token's log probability, and its top_logprobs alternatives
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def calls_tools(self) -> bool:
        """Whether the model may answer with tool calls."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced_tool(self) -> str | None:
        """The one tool the model must call, if the request names one."""
        return None if self.tool_choice in TOOL_CHOICES else self.tool_choice

    @property
    def deterministic(self) -> bool:
        """True when the same request gives the same answer: greedy decoding
        (temperature 0) or a fixed seed."""
        return self.temperature == 0 or self.seed is not None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": list(self.stop),
            "seed": self.seed,
        }
        if self.format is not None:
            out["format"] = self.format.to_dict()
        if self.raw:
            out["raw"] = True
        if self.logprobs:
            out["logprobs"] = True
            out["top_logprobs"] = self.top_logprobs
        if self.tools:
            out["tools"] = [t.to_dict() for t in self.tools]
            out["tool_choice"] = (self.tool_choice if self.forced_tool is None
                                  else {"name": self.tool_choice})
            out["parallel_tool_calls"] = self.parallel_tool_calls
        return out

_MODEL_KEYS = {"model", "max_tokens", "maxTokens", "temperature", "top_p", "topP", "stop", "seed"}
_TOP_KEYS = {"prompt", "messages", "system", "modelConfig", "cache", "stream",
             "format", "raw", "tools", "tool_choice", "parallel_tool_calls", "logprobs",
             "top_logprobs"} | _MODEL_KEYS
_CANONICAL = {"maxTokens": "max_tokens", "topP": "top_p"}


@dataclass(frozen=True)
class ParamLimits:
    """Bounds and defaults for prompt parameters (from ``[inference]``)."""

    max_tokens: int = 4096
    default_max_tokens: int = 256
    default_temperature: float = 0.7
    default_top_p: float = 0.95
    max_messages: int = 64
    max_prompt_chars: int = 32_000
    max_stop: int = 4
    max_stop_chars: int = 64


@dataclass(frozen=True)
class PromptRequest:
    """A validated ``processPrompt`` call. ``model`` None means the default."""

    model: str | None
    messages: tuple[Message, ...]
    params: GenerationParams
    use_cache: bool = True
    stream: bool = True
    share: str = ""  # whose slots these are, for fair share (see inference.slots)

    @property
    def needs(self) -> frozenset[str]:
        """The capabilities serving this request takes: ``chat`` (or
        ``complete`` for a raw one), and ``json`` or ``tools`` if asked."""
        needs = {"complete" if self.params.raw else "chat"}
        if self.params.format is not None:
            needs.add("json")
        if self.params.calls_tools:
            needs.add("tools")
        if self.params.logprobs:
            needs.add("logprobs")
        return frozenset(needs)


@dataclass(frozen=True)
class EmbedRequest:
    """A validated embedding request: ``texts`` in order, ``model`` None
    for the node's default embedding model."""

    model: str | None
    texts: tuple[str, ...]
    share: str = ""


def parse_embed_params(params: Any) -> EmbedRequest:
    """Check ``embed`` params: ``{"input": "text" | ["text", ...], "model"?}``.

    Raises:
        InvalidParams: naming the first bad field.
    """
    if not isinstance(params, dict):
        _raise("params", f"must be a map with input, got {_show(params)}")
    for key in params:
        if key not in ("input", "model"):
            _raise(str(key)[:64], "unknown key")
    value = params.get("input")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_EMBED_INPUTS:
        _raise("input", f"must be a text or a list of 1 to {MAX_EMBED_INPUTS} texts, "
                        f"got {_show(value)}")
    texts = []
    for i, item in enumerate(items):
        field = "input" if isinstance(value, str) else f"input[{i}]"
        text = _text(item, field)
        if not text:
            _raise(field, "is empty")
        if len(text) > MAX_EMBED_CHARS:
            _raise(field, f"at most {MAX_EMBED_CHARS} characters, got {len(text)}")
        texts.append(text)
    model = params.get("model")
    return EmbedRequest(None if model is None else parse_model_name(model), tuple(texts))


def token_logprobs(value: Any, top: bool = True) -> list[dict[str, Any]]:
    """Token log probabilities as a backend reported them (OpenAI's shape),
    kept to ``{token, logprob, bytes, top_logprobs}`` with checked types;
    entries that are not such are dropped."""
    out: list[dict[str, Any]] = []
    if not isinstance(value, list):
        return out
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("token"), str):
            continue
        logprob = item.get("logprob")
        if isinstance(logprob, bool) or not isinstance(logprob, int | float):
            continue
        raw = item.get("bytes")
        entry: dict[str, Any] = {
            "token": item["token"], "logprob": float(logprob),
            "bytes": [b for b in raw if type(b) is int and 0 <= b < 256]
            if isinstance(raw, list) else None}
        if top:
            entry["top_logprobs"] = token_logprobs(item.get("top_logprobs"), top=False)
        out.append(entry)
    return out


def _fail(field: str, problem: str) -> InvalidParams:
    return InvalidParams(f"{field}: {problem}", data={"field": field})


def parse_model_name(value: Any, field: str = "model") -> str:
    """A model name (``smollm2``, ``llama3:8b``, ``org/name``) or InvalidParams."""
    if not isinstance(value, str) or not MODEL_NAME.match(value):
        _raise(field, f"must be a model name (letters, digits, ._:/@+-; at most 128), "
                             f"got {_show(value)}")
    return value


def _raise(field: str, problem: str) -> NoReturn:
    raise _fail(field, problem)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        _raise(field, f"must be a number, got {_show(value)}")
    number = float(value)
    if not math.isfinite(number):
        _raise(field, "must be a finite number")
    return number


def _integer(value: Any, field: str, low: int, high: int) -> int:
    if type(value) is not int:
        _raise(field, f"must be an integer, got {_show(value)}")
    if not low <= value <= high:
        _raise(field, f"must be between {low} and {high}, got {value}")
    return int(value)


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        _raise(field, f"must be a string, got {_show(value)}")
    return str(value)


def _messages(value: Any, limits: ParamLimits) -> tuple[Message, ...]:
    if not isinstance(value, list):
        _raise("messages", f"must be a list of {{role, content}} maps, got {_show(value)}")
    if not value:
        _raise("messages", "must not be empty")
    if len(value) > limits.max_messages:
        _raise("messages", f"at most {limits.max_messages} messages, got {len(value)}")
    out = []
    for i, item in enumerate(value):
        field = f"messages[{i}]"
        if not isinstance(item, dict):
            _raise(field, f"must be a map with role and content, got {_show(item)}")
        extra = set(item) - {"role", "content", "tool_calls", "tool_call_id"}
        if extra:
            _raise(f"{field}.{sorted(map(str, extra))[0]}", "unknown key")
        role = item.get("role")
        if role not in ROLES:
            _raise(f"{field}.role", f"must be one of {', '.join(ROLES)}, got {_show(role)}")
        calls: tuple[ToolCall, ...] = ()
        if item.get("tool_calls") is not None:
            if role != "assistant":
                _raise(f"{field}.tool_calls", "only in an assistant message")
            calls = parse_tool_calls(item["tool_calls"], f"{field}.tool_calls")
        call_id = item.get("tool_call_id")
        if role == "tool":
            if not isinstance(call_id, str) or not TOOL_CALL_ID.match(call_id):
                _raise(f"{field}.tool_call_id", "a tool message names the call it answers "
                       "(1 to 64 letters, digits or _.:-)")
        elif call_id is not None:
            _raise(f"{field}.tool_call_id", "only in a tool message")
        if "content" not in item and not calls:
            _raise(f"{field}.content", "is required")
        content = item.get("content")
        text = "" if content is None and calls else _text(content, f"{field}.content")
        out.append(Message(str(role), text, calls, call_id))
    return tuple(out)


def parse_tool_calls(value: Any, field: str = "tool_calls") -> tuple[ToolCall, ...]:
    """Tool calls as a message or an answer carries them, checked
    (InvalidParams naming the first bad field)."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TOOL_CALLS:
        _raise(field, f"must be a list of 1 to {MAX_TOOL_CALLS} calls, got {_show(value)}")
    out = []
    for i, call in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(call, dict):
            _raise(where, f"must be a map with id, name and arguments, got {_show(call)}")
        extra = set(call) - {"id", "name", "arguments"}
        if extra:
            _raise(f"{where}.{sorted(map(str, extra))[0]}", "unknown key")
        call_id, name, arguments = call.get("id"), call.get("name"), call.get("arguments", "{}")
        if not isinstance(call_id, str) or not TOOL_CALL_ID.match(call_id):
            _raise(f"{where}.id", "must be 1 to 64 letters, digits or _.:-")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            _raise(f"{where}.name", "must be 1 to 64 letters, digits, _ or -")
        if not isinstance(arguments, str):
            _raise(f"{where}.arguments", "must be JSON text (a string)")
        out.append(ToolCall(call_id, name, arguments))
    return tuple(out)


def _schema(value: Any, field: str) -> dict[str, Any]:
    """A JSON Schema (a map), checked and bounded."""
    if not isinstance(value, dict):
        _raise(field, f"must be a JSON Schema (a map), got {_show(value)}")
    try:
        size = len(json.dumps(value, separators=(",", ":"), allow_nan=False))
    except (TypeError, ValueError) as exc:
        _raise(field, f"must be plain JSON: {exc}")
    if size > MAX_SCHEMA_BYTES:
        _raise(field, f"at most {MAX_SCHEMA_BYTES} bytes as JSON, got {size}")
    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.exceptions.SchemaError as exc:
        _raise(field, f"is not a valid JSON Schema: {exc.message}")
    except Exception as exc:  # e.g. an unresolvable $schema or $ref
        _raise(field, f"cannot be used: {type(exc).__name__}: {exc}")
    return value


def _tools(value: Any) -> tuple[Tool, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        _raise("tools", f"must be a list of at most {MAX_TOOLS} functions, got {_show(value)}")
    out: list[Tool] = []
    for i, item in enumerate(value):
        field = f"tools[{i}]"
        if not isinstance(item, dict):
            _raise(field, f"must be a map with a name, got {_show(item)}")
        extra = set(item) - {"name", "description", "parameters"}
        if extra:
            _raise(f"{field}.{sorted(map(str, extra))[0]}", "unknown key")
        name = item.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            _raise(f"{field}.name", "must be 1 to 64 letters, digits, _ or -")
        if any(t.name == name for t in out):
            _raise(f"{field}.name", f"{name!r} is given twice")
        description = item.get("description", "")
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
            _raise(f"{field}.description", f"must be text of at most {MAX_DESCRIPTION} "
                   "characters")
        parameters = item.get("parameters")
        if parameters is not None:
            parameters = _schema(parameters, f"{field}.parameters")
        out.append(Tool(name, description, parameters))
    return tuple(out)


def _tool_choice(value: Any, tools: tuple[Tool, ...]) -> str:
    if value is None:
        return "auto"
    if isinstance(value, dict):
        extra = set(value) - {"name"}
        if extra:
            _raise(f"tool_choice.{sorted(map(str, extra))[0]}", "unknown key")
        name = value.get("name")
        if not any(t.name == name for t in tools):
            _raise("tool_choice.name", f"must name one of the tools, got {_show(name)}")
        return str(name)
    if value not in TOOL_CHOICES:
        _raise("tool_choice", 'must be "auto", "none", "required" or {"name": ...}, '
               f"got {_show(value)}")
    if value == "required" and not tools:
        _raise("tool_choice", "required needs tools")
    return str(value)


def _stop(value: Any, limits: ParamLimits) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        _raise("stop", f"must be a string or a list of strings, got {_show(value)}")
    if len(items) > limits.max_stop:
        _raise("stop", f"at most {limits.max_stop} stop sequences, got {len(items)}")
    out = []
    for i, item in enumerate(items):
        field = "stop" if isinstance(value, str) else f"stop[{i}]"
        text = _text(item, field)
        if not 1 <= len(text) <= limits.max_stop_chars:
            _raise(field, f"must be 1 to {limits.max_stop_chars} characters long")
        out.append(text)
    return tuple(out)


def _format(value: Any) -> OutputFormat | None:
    if value is None or value == "text" or value == {"type": "text"}:
        return None
    if value == "json" or value == {"type": "json"}:
        return OutputFormat()
    if not isinstance(value, dict):
        _raise("format", f'must be "json" or a map with a type, got {_show(value)}')
    kind = value.get("type")
    if kind != "json_schema":
        _raise("format.type", f"must be text, json or json_schema, got {_show(kind)}")
    extra = set(value) - {"type", "schema", "name", "strict"}
    if extra:
        _raise(f"format.{sorted(map(str, extra))[0]}", "unknown key")
    schema = _schema(value.get("schema"), "format.schema")
    name = value.get("name", "answer")
    if not isinstance(name, str) or not SCHEMA_NAME.match(name):
        _raise("format.name", "must be 1 to 64 letters, digits, _ or -")
    strict = value.get("strict", False)
    if not isinstance(strict, bool):
        _raise("format.strict", f"must be true or false, got {_show(strict)}")
    return OutputFormat(schema=schema, name=name, strict=strict)


def _merge_model_config(params: dict[str, Any]) -> dict[str, Any]:
    """Top-level and ``modelConfig`` fields as one map of canonical names."""
    merged: dict[str, Any] = {}
    sources: list[tuple[str, dict[str, Any]]] = [("", params)]
    config = params.get("modelConfig")
    if config is not None:
        if not isinstance(config, dict):
            _raise("modelConfig", f"must be a map, got {_show(config)}")
        sources.append(("modelConfig.", config))
    for prefix, source in sources:
        allowed = _TOP_KEYS if not prefix else _MODEL_KEYS
        for key in source:
            if not isinstance(key, str) or key not in allowed:
                _raise(f"{prefix}{key}", "unknown key")
            if key not in _MODEL_KEYS:
                continue
            name = _CANONICAL.get(key, key)
            if name in merged:
                _raise(f"{prefix}{key}", "given twice")
            merged[name] = source[key]
    return merged


def requested_model(params: Any) -> str | None:
    """The model ``params`` name (``model``, or ``modelConfig.model``),
    checked as :func:`parse_prompt_params` checks it, and nothing else: for
    a front end that finds the model before handing the request to a
    gateway, which checks the whole request (InvalidParams)."""
    if isinstance(params, str):
        return None
    if not isinstance(params, dict):
        _raise("params", f"must be a map (or a prompt string), got {_show(params)}")
    model = params.get("model")
    config = params.get("modelConfig")
    if isinstance(config, dict) and "model" in config:
        if "model" in params:
            _raise("modelConfig.model", "given twice")
        model = config["model"]
    return None if model is None else parse_model_name(model)


def parse_prompt_params(params: Any, limits: ParamLimits | None = None) -> PromptRequest:
    """Check ``processPrompt`` params and build a :class:`PromptRequest`.

    Raises:
        InvalidParams: naming the first bad field (``data["field"]``).
    """
    limits = limits or ParamLimits()
    if isinstance(params, str):
        params = {"prompt": params}
    if not isinstance(params, dict):
        _raise("params", f"must be a map (or a prompt string), got {_show(params)}")
    fields = _merge_model_config(params)

    if "prompt" in params and "messages" in params:
        _raise("prompt", "give either prompt or messages, not both")
    if "messages" in params:
        if "system" in params:
            _raise("system", "only with prompt; put a system message in messages instead")
        messages = _messages(params["messages"], limits)
    elif "prompt" in params:
        prompt = _text(params["prompt"], "prompt")
        head: list[Message] = []
        if params.get("system") is not None:
            head.append(Message("system", _text(params["system"], "system")))
        messages = (*head, Message("user", prompt))
    else:
        _raise("prompt", "a prompt or messages are required")
    chars = sum(len(m.content) + sum(len(c.arguments) for c in m.tool_calls)
                for m in messages)
    if chars == 0:
        _raise("prompt" if "prompt" in params else "messages", "is empty")
    if chars > limits.max_prompt_chars:
        _raise("prompt" if "prompt" in params else "messages",
               f"at most {limits.max_prompt_chars} characters, got {chars}")

    model = fields.get("model")
    if model is not None:
        model = parse_model_name(model)
    max_tokens = limits.default_max_tokens
    if fields.get("max_tokens") is not None:
        max_tokens = _integer(fields["max_tokens"], "max_tokens", 1, limits.max_tokens)
    temperature = limits.default_temperature
    if fields.get("temperature") is not None:
        temperature = _number(fields["temperature"], "temperature")
        if not 0.0 <= temperature <= 2.0:
            _raise("temperature", f"must be between 0 and 2, got {temperature}")
    top_p = limits.default_top_p
    if fields.get("top_p") is not None:
        top_p = _number(fields["top_p"], "top_p")
        if not 0.0 < top_p <= 1.0:
            _raise("top_p", f"must be greater than 0 and at most 1, got {top_p}")
    seed = None
    if fields.get("seed") is not None:
        seed = _integer(fields["seed"], "seed", 0, MAX_SEED)
    use_cache = params.get("cache", True)
    if not isinstance(use_cache, bool):
        _raise("cache", f"must be true or false, got {_show(use_cache)}")
    stream = params.get("stream", True)
    if not isinstance(stream, bool):
        _raise("stream", f"must be true or false, got {_show(stream)}")
    raw = params.get("raw", False)
    if not isinstance(raw, bool):
        _raise("raw", f"must be true or false, got {_show(raw)}")
    if raw and ("messages" in params or params.get("system") is not None):
        _raise("raw", "only with prompt alone: a raw prompt is continued as it is, "
                      "without system or chat messages")
    fmt = _format(params.get("format"))
    if raw and fmt is not None:
        _raise("format", "not with raw: a raw completion has no output format")
    tools = _tools(params.get("tools"))
    choice = _tool_choice(params.get("tool_choice"), tools)
    parallel = params.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        _raise("parallel_tool_calls", f"must be true or false, got {_show(parallel)}")
    if tools and raw:
        _raise("tools", "not with raw: a raw completion calls no tools")
    if tools and choice != "none" and fmt is not None:
        _raise("tools", "not with format: give tools or an output format, not both")
    logprobs = params.get("logprobs", False)
    if logprobs is None:
        logprobs = False
    if not isinstance(logprobs, bool):
        _raise("logprobs", f"must be true or false, got {_show(logprobs)}")
    top = 0
    if params.get("top_logprobs") is not None:
        top = _integer(params["top_logprobs"], "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top and not logprobs:
            _raise("top_logprobs", "needs logprobs: true")
    if logprobs and raw:
        _raise("logprobs", "not with raw (ask through chat messages)")
    if logprobs and tools and choice != "none":
        _raise("logprobs", "not with tools: a tool call's tokens are not the answer's")
    return PromptRequest(
        model=model,
        messages=messages,
        params=GenerationParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=_stop(fields.get("stop"), limits),
            seed=seed,
            format=fmt,
            raw=raw,
            tools=tools,
            tool_choice=choice,
            parallel_tool_calls=parallel,
            logprobs=logprobs,
            top_logprobs=top,
        ),
        use_cache=use_cache,
        stream=stream,
    )
