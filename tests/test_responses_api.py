"""OpenAI's Responses API (``/v1/responses``) with the official ``openai``
package against one node serving the embedded SmolLM2: plain and streamed
answers, function tools and their results, structured output, and what is
refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pydantic
import pytest
import trio

from p2pinfer import errors
from p2pinfer.web.openai_responses import responses_request

from .test_structured_output import CITY, openai_client
from .test_tools import WEATHER, check_call
from .test_web_support import web_swarm

FUNCTION = {"type": "function", **WEATHER, "strict": True}


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=40)
    age: int = pydantic.Field(ge=0, le=150)


def test_a_responses_request_becomes_prompt_parameters() -> None:
    params, stream = responses_request({
        "model": "smollm2", "instructions": "Be brief.", "max_output_tokens": 30,
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather",
             "arguments": '{"city": "Oslo"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "rain"},
        ],
        "tools": [FUNCTION], "tool_choice": {"type": "function", "name": "get_weather"},
        "store": True, "stream": True})
    assert stream is True
    assert params["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"}]
    assert params["tools"] == [WEATHER] and params["tool_choice"] == {"name": "get_weather"}
    assert params["max_tokens"] == 30
    for body, field in (({"input": "x", "previous_response_id": "resp_1"},
                         "previous_response_id"),
                        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
                        ({"input": [{"type": "reasoning"}]}, "input[0].type"),
                        ({"input": "x", "text": {"format": {"type": "xml"}}},
                         "text.format.type"),
                        ({"input": []}, "input"), ({"input": "x", "wat": 1}, "wat")):
        with pytest.raises(errors.InvalidParams) as info:
            responses_request(body)
        assert info.value.data["field"] == field


async def test_the_openai_package_s_responses_client(tmp_path: Path,
                                                      nursery: trio.Nursery) -> None:
    with trio.fail_after(300):
        async with web_swarm(nursery, tmp_path, models=None) as swarm:
            alice = await swarm.account("alice")
            client = openai_client(swarm.url, alice.api_key)

            def session() -> dict[str, Any]:
                out: dict[str, Any] = {}
                out["plain"] = client.responses.create(
                    model="smollm2", input="Say hello.", instructions="Answer briefly.",
                    max_output_tokens=40, temperature=0)
                out["events"] = list(client.responses.create(
                    model="smollm2", input="Name three colors.", max_output_tokens=40,
                    temperature=0, stream=True))
                out["tool"] = client.responses.create(
                    model="smollm2", input="What is the weather in Paris?", tools=[FUNCTION],
                    tool_choice="required", temperature=0, max_output_tokens=120)
                call = next(i for i in out["tool"].output if i.type == "function_call")
                out["after"] = client.responses.create(
                    model="smollm2", tools=[FUNCTION], temperature=0, max_output_tokens=60,
                    input=[{"role": "user", "content": "What is the weather in Paris?"},
                           {"type": "function_call", "call_id": call.call_id,
                            "name": call.name, "arguments": call.arguments},
                           {"type": "function_call_output", "call_id": call.call_id,
                            "output": "Sunny, 24 degrees."}])
                out["json"] = client.responses.create(
                    model="smollm2", input="Describe Paris as JSON.", temperature=0,
                    max_output_tokens=120, text={"format": {
                        "type": "json_schema", "name": "city", "schema": CITY,
                        "strict": True}})
                out["parsed"] = client.responses.parse(
                    model="smollm2", input="A person, as JSON.", temperature=0,
                    max_output_tokens=120, text_format=Person)
                try:
                    client.responses.create(model="smollm2", input="x",
                                            previous_response_id="resp_123")
                except openai.APIStatusError as exc:
                    out["refused"] = exc
                return out

            got = await trio.to_thread.run_sync(session)

    plain = got["plain"]
    assert plain.object == "response" and plain.status in ("completed", "incomplete")
    assert plain.output_text and plain.usage.output_tokens <= 40
    assert plain.usage.total_tokens == plain.usage.input_tokens + plain.usage.output_tokens
    events = got["events"]
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert streamed and final.output_text == streamed
    calls = [i for i in got["tool"].output if i.type == "function_call"]
    assert calls and all(c.call_id.startswith("call_") for c in calls)
    for c in calls:
        check_call(c.name, c.arguments)
    assert got["after"].status in ("completed", "incomplete")
    jsonschema.validate(json.loads(got["json"].output_text), CITY)
    person = got["parsed"].output_parsed
    assert isinstance(person, Person)
    refused = got["refused"]
    assert refused.status_code == 400 and refused.body["param"] == "previous_response_id"
