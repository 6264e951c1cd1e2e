"""Tool calling: what agent code sends first (openai's ``tools``, Ollama's
``tools``, LangChain's ``bind_tools``), end to end.

The embedded SmolLM2's chat template knows no tools, so llama-server alone
would ignore them: the llama.cpp backend asks in a generic JSON form under a
grammar (p2pinfer/inference/toolcalls.py), and these tests run it through
the real runner with the official ``openai`` and ``ollama`` packages, the
SDK and the CLI. HTTP backends pass tools on; what an OpenAI-compatible
server streams back is joined into whole calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import jsonschema
import ollama
import openai
import pytest
import trio

from p2pinfer import errors
from p2pinfer.cli.store import Credentials, CredentialStore
from p2pinfer.client import SyncClient
from p2pinfer.inference import InferenceEngine, OpenAIBackend
from p2pinfer.inference.backend import GenerationRequest
from p2pinfer.inference.llamacpp import LlamaCppBackend, LlamaCppOptions
from p2pinfer.inference.ollama import OllamaBackend
from p2pinfer.inference.toolcalls import (
    ToolCallDeltas,
    answer_schema,
    generic_messages,
    parse_answer,
)
from p2pinfer.prompts import parse_prompt_params

from .test_cli_main import cli_env, invoke  # noqa: F401 - cli_env is autouse
from .test_inference_openai import FakeOpenAI, ask, sse, started_engine
from .test_sdk import BackgroundSwarm
from .test_structured_output import SMOLLM2, openai_client, swarm  # noqa: F401 - fixture
from .test_web_support import FAKE, web_swarm

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40},
                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
ADD = {
    "name": "add",
    "description": "Add two numbers",
    "parameters": {"type": "object",
                   "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"], "additionalProperties": False},
}
SCHEMAS = {t["name"]: t["parameters"] for t in (WEATHER, ADD)}


def as_openai(tool: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": tool}


def check_call(name: str, arguments: str | dict[str, Any]) -> dict[str, Any]:
    """A call names a real tool and its arguments match that tool's schema."""
    value = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(value, SCHEMAS[name])
    return value


# -- the contract ---------------------------------------------------------------------------
def test_the_tools_contract() -> None:
    req = parse_prompt_params({
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        ],
        "tools": [WEATHER, ADD], "tool_choice": {"name": "add"},
        "parallel_tool_calls": False})
    params = req.params
    assert req.needs == {"chat", "tools"} and params.forced_tool == "add"
    assert not params.parallel_tool_calls and params.calls_tools
    assert req.messages[1].tool_calls[0].parsed_arguments() == {"city": "Oslo"}
    assert req.messages[2].to_dict() == {"role": "tool", "content": "sunny, 21 C",
                                         "tool_call_id": "call_1"}
    # the cache key and the wire form keep what decides the answer
    assert params.to_dict()["tool_choice"] == {"name": "add"}
    assert parse_prompt_params({"prompt": "x", "tools": [ADD], "tool_choice": "none"}
                               ).needs == {"chat"}
    for params_in, field, message in (
        ({"tools": {"name": "x"}}, "tools", "list of at most 32"),
        ({"tools": [{"name": "a b"}]}, "tools[0].name", "1 to 64"),
        ({"tools": [ADD, ADD]}, "tools[1].name", "given twice"),
        ({"tools": [{"name": "f", "parameters": {"type": 3}}]}, "tools[0].parameters",
         "not a valid JSON Schema"),
        ({"tools": [{"name": "f", "strict": True}]}, "tools[0].strict", "unknown key"),
        ({"tools": [ADD], "tool_choice": {"name": "nope"}}, "tool_choice.name",
         "one of the tools"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [ADD], "tool_choice": "always"}, "tool_choice", "auto"),
        ({"tools": [ADD], "parallel_tool_calls": 1}, "parallel_tool_calls", "true or false"),
        ({"tools": [ADD], "raw": True}, "tools", "not with raw"),
        ({"tools": [ADD], "format": "json"}, "tools", "not with format"),
    ):
        with pytest.raises(errors.InvalidParams, match=message) as info:
            parse_prompt_params({"prompt": "x", **params_in})
        assert info.value.data["field"] == field
    for messages, field in (
        ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
        ([{"role": "user", "content": "x", "tool_call_id": "c"}], "messages[0].tool_call_id"),
        ([{"role": "user", "content": "x", "tool_calls": [
            {"id": "c", "name": "f", "arguments": "{}"}]}], "messages[0].tool_calls"),
        ([{"role": "assistant", "tool_calls": [{"id": "c", "name": "f", "arguments": {}}]}],
         "messages[0].tool_calls[0].arguments"),
        ([{"role": "assistant", "tool_calls": []}], "messages[0].tool_calls"),
    ):
        with pytest.raises(errors.InvalidParams) as info:
            parse_prompt_params({"messages": messages})
        assert info.value.data["field"] == field


def test_the_generic_form_always_names_a_tool_and_matches_its_schema() -> None:
    def params(**kw: Any) -> Any:
        return parse_prompt_params({"prompt": "x", "tools": [WEATHER, ADD], **kw}).params

    auto = answer_schema(params())
    call = {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}
    jsonschema.validate(call, auto)
    jsonschema.validate({"response": "hello"}, auto)
    for bad in ({"tool_calls": [{"name": "rm", "arguments": {}}]},
                {"tool_calls": [{"name": "add", "arguments": {"a": "one", "b": 2}}]},
                {"tool_calls": []}, {"answer": "x"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, auto)
    forced = answer_schema(params(tool_choice={"name": "get_weather"},
                                  parallel_tool_calls=False))
    jsonschema.validate({"tool_calls": [{"name": "get_weather", "arguments": {"city": "X"}}]},
                        forced)
    for bad in ({"response": "hi"}, call, {"tool_calls": [
            {"name": "get_weather", "arguments": {"city": "X"}}] * 2}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, forced)

    history = parse_prompt_params({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {"role": "assistant", "tool_calls": [
            {"id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
            {"id": "c2", "name": "get_weather", "arguments": '{"city": "Rome"}'}]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
        {"role": "tool", "tool_call_id": "c2", "content": "sun"},
    ], "tools": [WEATHER]})
    sent = generic_messages(history.messages, history.params)
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[0]["content"].startswith("Be brief.") and "get_weather" in sent[0]["content"]
    assert json.loads(sent[2]["content"])["tool_calls"][1]["arguments"] == {"city": "Rome"}
    assert sent[3]["content"] == "Result of tool call c1: rain\nResult of tool call c2: sun"

    text, calls = parse_answer('{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}')
    assert text == "" and [(c.name, c.parsed_arguments()) for c in calls] == [
        ("add", {"a": 1, "b": 2})]
    assert calls[0].id.startswith("call_")
    # a small model looping on one call until max_tokens: the complete ones, once
    looped = '{"tool_calls": [' + '{"name": "add", "arguments": {"a": 2, "b": 3}}, ' * 3 + '{"na'
    assert [c.arguments for c in parse_answer(looped)[1]] == ['{"a": 2, "b": 3}']
    assert parse_answer('{"response": "Hi there"}') == ("Hi there", ())
    assert parse_answer('{"response": "cut sho') == ("cut sho", ())
    assert parse_answer("not json") == ("not json", ())


def test_each_backend_asks_its_server_for_tools() -> None:
    req = parse_prompt_params({"messages": [
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "name": "add",
                                              "arguments": '{"a": 2, "b": 3}'}]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"}],
        "tools": [ADD, WEATHER], "tool_choice": {"name": "add"}, "parallel_tool_calls": False})
    request = GenerationRequest(req.messages, req.params)
    body = OpenAIBackend("remote").request_body(request)
    assert body["tools"] == [as_openai(ADD), as_openai(WEATHER)]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "add"}}
    assert body["parallel_tool_calls"] is False
    assert body["messages"][1]["tool_calls"] == [
        {"id": "c1", "type": "function", "function": {"name": "add",
                                                      "arguments": '{"a": 2, "b": 3}'}}]
    body = OllamaBackend("remote").request_body(request)
    assert body["tools"] == [as_openai(ADD)]  # Ollama has no tool_choice
    assert body["messages"][1]["tool_calls"] == [
        {"function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]
    body = LlamaCppBackend("smollm2", LlamaCppOptions(path=Path("/x.gguf"))).request_body(
        request)
    assert "tools" not in body and body["messages"][0]["role"] == "system"
    assert body["response_format"]["schema"] == answer_schema(req.params)


async def test_an_openai_compatible_server_s_streamed_calls_are_joined(
        nursery: trio.Nursery) -> None:
    """OpenAI streams a call as pieces: the id and name once, the arguments
    in parts, several calls told apart by index."""
    handler = FakeOpenAI()

    def piece(index: int, **fields: Any) -> dict[str, Any]:
        return {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": index, **fields}]}, "finish_reason": None}]}

    handler.response = httpx2.Response(200, content=sse(
        piece(0, id="call_a", type="function", function={"name": "add", "arguments": ""}),
        piece(0, function={"arguments": '{"a": 2,'}),
        piece(1, id="call_b", type="function", function={"name": "get_weather",
                                                         "arguments": '{"city"'}),
        piece(0, function={"arguments": ' "b": 3}'}),
        piece(1, function={"arguments": ': "Oslo"}'}),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 20}}, "[DONE]"))
    backend = OpenAIBackend("gpt", base_url="https://api.example.test/v1",
                            transport=httpx2.MockTransport(handler))
    engine: InferenceEngine = await started_engine(nursery, backend)
    with trio.fail_after(10):
        await engine.wait_settled()
        chunks, done = await ask(engine, {"prompt": "x", "tools": [ADD, WEATHER]})
    assert chunks == [] and done.finish_reason == "tool_calls"
    assert [(c.id, c.name, c.parsed_arguments()) for c in done.tool_calls] == [
        ("call_a", "add", {"a": 2, "b": 3}), ("call_b", "get_weather", {"city": "Oslo"})]
    sent = json.loads(handler.requests[0].content)
    assert sent["tools"] == [as_openai(ADD), as_openai(WEATHER)] and sent["tool_choice"] == "auto"

    joined = ToolCallDeltas()  # Ollama sends each call whole, arguments as an object
    joined.feed([{"function": {"name": "add", "arguments": {"a": 1, "b": 1}}}])
    assert [(c.name, c.arguments) for c in joined.calls()] == [("add", '{"a": 1, "b": 1}')]


# -- end to end on the real model ----------------------------------------------------------
async def test_openai_and_ollama_clients_call_tools_on_the_embedded_model(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    tools = [as_openai(WEATHER), as_openai(ADD)]
    with trio.fail_after(300):
        async with web_swarm(nursery, tmp_path, models=(SMOLLM2, FAKE)) as swarm:
            alice = await swarm.account("alice")
            client = openai_client(swarm.url, alice.api_key)
            oll = ollama.Client(host=swarm.url, headers={"Authorization":
                                                         f"Bearer {alice.api_key}"})
            ask_weather = [{"role": "user", "content": "What is the weather in Paris?"}]

            def session() -> dict[str, Any]:
                out: dict[str, Any] = {}
                out["required"] = client.chat.completions.create(
                    model="smollm2", messages=ask_weather, tools=tools,
                    tool_choice="required", temperature=0, max_tokens=120)
                out["named"] = client.chat.completions.create(
                    model="smollm2", tools=tools, temperature=0, max_tokens=120,
                    messages=[{"role": "user", "content": "What is 2 plus 3?"}],
                    tool_choice={"type": "function", "function": {"name": "add"}},
                    parallel_tool_calls=False)
                out["streamed"] = list(client.chat.completions.create(
                    model="smollm2", messages=ask_weather, tools=tools, stream=True,
                    tool_choice="required", temperature=0, max_tokens=120,
                    stream_options={"include_usage": True}))
                call = out["required"].choices[0].message.tool_calls[0]
                # the history an agent sends back: the call and its result
                out["after"] = client.chat.completions.create(
                    model="smollm2", tools=tools, temperature=0, max_tokens=80,
                    messages=[*ask_weather,
                              {"role": "assistant", "content": None, "tool_calls": [
                                  {"id": call.id, "type": "function",
                                   "function": {"name": call.function.name,
                                                "arguments": call.function.arguments}}]},
                              {"role": "tool", "tool_call_id": call.id,
                               "content": "Sunny, 24 degrees Celsius."}])
                # Ollama has no tool_choice: the model decides (auto), and
                # a 135M model calls a tool when told to
                call_it = [{"role": "user", "content": "Call get_weather for Paris."}]
                out["ollama"] = oll.chat(
                    model="smollm2", messages=call_it, tools=[as_openai(WEATHER)],
                    options={"temperature": 0, "num_predict": 120})
                out["ollama_streamed"] = list(oll.chat(
                    model="smollm2", messages=call_it, tools=[as_openai(WEATHER)],
                    stream=True, options={"temperature": 0, "num_predict": 120}))
                try:
                    client.chat.completions.create(model="fake", messages=ask_weather,
                                                   tools=tools)
                except openai.APIStatusError as exc:
                    out["refused"] = exc
                try:  # the same refusal in Ollama's shape
                    oll.chat(model="fake", messages=ask_weather, tools=[as_openai(WEATHER)])
                except ollama.ResponseError as exc:
                    out["ollama_refused"] = exc
                return out

            got = await trio.to_thread.run_sync(session)

    required = got["required"].choices[0]
    assert required.finish_reason == "tool_calls" and required.message.content is None
    for call in required.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        check_call(call.function.name, call.function.arguments)
    named = got["named"].choices[0].message.tool_calls
    assert len(named) == 1 and named[0].function.name == "add"
    assert check_call("add", named[0].function.arguments) == {"a": 2, "b": 3}
    # streamed: the calls arrive as tool_calls deltas, joined by index as openai does
    pieces: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in got["streamed"]:
        for choice in chunk.choices:
            for piece in choice.delta.tool_calls or []:
                slot = pieces.setdefault(piece.index, {"name": "", "arguments": ""})
                slot["name"] += piece.function.name or ""
                slot["arguments"] += piece.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and pieces
    for slot in pieces.values():
        check_call(slot["name"], slot["arguments"])
    assert got["streamed"][-1].usage.completion_tokens > 0
    after = got["after"].choices[0]  # an answer or another call: either parses
    assert after.finish_reason in ("stop", "tool_calls", "length")
    if after.finish_reason == "tool_calls":
        for call in after.message.tool_calls:
            check_call(call.function.name, call.function.arguments)
    whole = got["ollama"].message.tool_calls
    assert whole and whole[0].function.name == "get_weather"
    check_call("get_weather", dict(whole[0].function.arguments))
    streamed_calls = [c for part in got["ollama_streamed"] for c in part.message.tool_calls or []]
    assert streamed_calls and got["ollama_streamed"][-1].done
    refused = got["refused"]
    assert refused.status_code == 400 and refused.body["code"] == "missing_capability"
    assert "tool calls" in refused.body["message"]
    ollama_refused = got["ollama_refused"]
    assert ollama_refused.status_code == 400 and "tool calls" in ollama_refused.error


def test_the_sdk_and_the_cli_call_tools(swarm: BackgroundSwarm,  # noqa: F811
                                        tmp_path: Path) -> None:
    user = swarm.account("tom")
    with SyncClient(bootstrap=[swarm.addr], api_key=user["api_key"]) as client:
        client.wait_for_model("smollm2")
        answer = client.inference("What is 2 plus 3?", model="smollm2", temperature=0,
                                  max_tokens=120, tools=[ADD, as_openai(WEATHER)],
                                  tool_choice="add")
        assert answer.finish_reason == "tool_calls" and answer.text == ""
        (call,) = answer.tool_calls
        assert call.name == "add" and check_call("add", call.arguments) == {"a": 2, "b": 3}
        # the result goes back with the call, and the model may answer
        history = [{"role": "user", "content": "What is 2 plus 3?"}, answer.message(),
                   {"role": "tool", "tool_call_id": call.id, "content": "5"}]
        again = client.inference(messages=history, model="smollm2", temperature=0,
                                 max_tokens=60, tools=[ADD])
        assert again.finish_reason in ("stop", "tool_calls", "length")
        with client.stream("What is the weather in Oslo?", model="smollm2", temperature=0,
                           max_tokens=120, tools=[WEATHER], tool_choice="required") as stream:
            assert "".join(stream) == ""
        assert stream.response is not None
        assert [c.name for c in stream.response.tool_calls][:1] == ["get_weather"]
        with pytest.raises(errors.InvalidParams, match="tool_choice.name"):
            client.inference("x", model="smollm2", tools=[ADD], tool_choice="nope")

    CredentialStore().save(Credentials(bootstrap=[swarm.addr], username="tom",
                                       api_key=user["api_key"], api_key_id=user["key_id"]))
    tool = tmp_path / "weather.json"
    tool.write_text(json.dumps(WEATHER))
    out = invoke("prompt", "-m", "smollm2", "-t", "0", "--max-tokens", "120", "--tool",
                 str(tool), "--tool-choice", "required", "What is the weather in Rome?")
    line = out.stdout.strip().splitlines()[0]
    assert line.startswith("get_weather(")
    check_call("get_weather", line[len("get_weather("):-1])
    data = json.loads(invoke("prompt", "-m", "smollm2", "-t", "0", "--max-tokens", "120",
                             "--tool", str(tool), "--tool-choice", "get_weather", "--json",
                             "Weather in Lima?").stdout)
    assert data["finish_reason"] == "tool_calls"
    assert data["tool_calls"][0]["name"] == "get_weather"
    out = invoke("prompt", "--tool-choice", "required", "x", code=2)
    assert "--tool-choice needs --tool" in out.output


def test_a_worker_s_bad_tool_calls_do_not_reach_a_client() -> None:
    """The gateway checks the calls in a worker's trailer before passing them on."""
    from p2pinfer.gateway.role import _tool_calls

    assert _tool_calls({}, "w") == {}
    good = [{"id": "c", "name": "add", "arguments": "{}"}]
    assert _tool_calls({"tool_calls": good}, "w") == {"tool_calls": good}
    with pytest.raises(errors.MalformedBackendResponse, match="bad tool calls"):
        _tool_calls({"tool_calls": [{"id": "c", "name": "rm -rf", "arguments": "{}"}]}, "w")
