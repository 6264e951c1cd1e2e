"""Structured output (answers constrained to JSON or to a JSON schema) and
raw completions (a prompt continued without the chat template).

What agent and RAG code sends first (LangChain's ``with_structured_output``,
openai's ``.parse()``, ``ollama.chat(format=...)``), against one node that
runs the embedded SmolLM2 through the real llama.cpp runner and a synthetic
model that cannot constrain its output. The official ``openai`` and
``ollama`` packages are synchronous, so they run in a worker thread while
trio serves the node.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import ollama
import openai
import pydantic
import pytest
import trio

from p2pinfer import errors
from p2pinfer.cli.errors import EXIT_USAGE
from p2pinfer.cli.store import Credentials, CredentialStore
from p2pinfer.client import Client, SyncClient
from p2pinfer.inference.synthetic import SyntheticBackend
from p2pinfer.prompts import OutputFormat, parse_prompt_params

from .helpers import wait_for
from .test_cli_main import cli_env, invoke  # noqa: F401 - cli_env is autouse
from .test_sdk import FAKE as FAKE_NAME
from .test_sdk import BackgroundSwarm
from .test_web_support import FAKE, web_swarm

SMOLLM2 = {"name": "smollm2", "backend": "llamacpp", "slots": 2, "default": True}
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 100},
        "coastal": {"type": "boolean"},
    },
    "required": ["city", "country", "population_millions", "coastal"],
    "additionalProperties": False,
}
FAKE_CAPS = SyntheticBackend.capabilities
PLACES = ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Sydney", "Toronto", "Mumbai", "Rome",
          "Nairobi", "Lisbon", "Seoul", "Bogota", "Dublin", "Hanoi", "Madrid", "Accra",
          "Vienna", "Quito", "Manila")


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=40)
    sunny: bool
    temperature_c: int = pydantic.Field(ge=-60, le=60)


async def _at_least(count: Any, n: int) -> bool:
    return bool(await count() >= n)


def openai_client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


async def test_openai_and_ollama_clients_get_answers_that_match_their_schema(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(300):
        async with web_swarm(nursery, tmp_path, models=(SMOLLM2, FAKE)) as swarm:
            alice = await swarm.account("alice")
            client = openai_client(swarm.url, alice.api_key)
            oll = ollama.Client(host=swarm.url, headers={"Authorization":
                                                         f"Bearer {alice.api_key}"})

            def session() -> dict[str, Any]:
                out: dict[str, Any] = {"schema": [], "errors": []}
                for place in PLACES:  # sampled, not greedy: each answer differs
                    chat = client.chat.completions.create(
                        model="smollm2", temperature=0.8, max_tokens=120,
                        messages=[{"role": "user", "content": f"Describe {place} as JSON."}],
                        response_format={"type": "json_schema", "json_schema": {
                            "name": "city", "schema": CITY, "strict": True}})
                    out["schema"].append(chat.choices[0])
                # any object: the model chooses its keys (and a 135M model
                # may ramble until max_tokens; this prompt does not)
                out["object"] = client.chat.completions.create(
                    model="smollm2", max_tokens=200, temperature=0,
                    messages=[{"role": "user", "content": "A person, as JSON."}],
                    response_format={"type": "json_object"})
                out["streamed"] = list(client.chat.completions.create(
                    model="smollm2", max_tokens=120, temperature=0, stream=True,
                    messages=[{"role": "user", "content": "Describe Paris as JSON."}],
                    response_format={"type": "json_schema", "json_schema": {
                        "name": "city", "schema": CITY}}))
                out["parsed"] = client.chat.completions.parse(
                    model="smollm2", max_tokens=120, temperature=0,
                    messages=[{"role": "user", "content": "The weather in Oslo today."}],
                    response_format=Weather)
                out["ollama_schema"] = oll.chat(
                    model="smollm2", format=CITY, options={"num_predict": 120},
                    messages=[{"role": "user", "content": "Describe Rome."}])
                out["ollama_json"] = oll.generate(
                    model="smollm2", format="json", prompt="A person, as JSON.",
                    options={"num_predict": 200, "temperature": 0})
                for call in (
                    lambda: client.chat.completions.create(  # cannot constrain
                        model="fake", messages=[{"role": "user", "content": "x"}],
                        response_format={"type": "json_object"}),
                    lambda: client.chat.completions.create(  # not a JSON schema
                        model="smollm2", messages=[{"role": "user", "content": "x"}],
                        response_format={"type": "json_schema", "json_schema": {
                            "name": "bad", "schema": {"type": "objekt"}}}),
                ):
                    try:
                        call()
                    except openai.APIStatusError as exc:
                        out["errors"].append(exc)
                try:
                    oll.chat(model="fake", format="json",
                             messages=[{"role": "user", "content": "x"}])
                except ollama.ResponseError as exc:
                    out["ollama_error"] = exc
                return out

            got = await trio.to_thread.run_sync(session)

            async def counted() -> int:
                usage = await swarm.node.rpc.call(swarm.node.peer_id, "getUsage",
                                                  {"auth": {"api_key": alice.api_key}})
                return sum(int(row["requests"]) for row in usage["usage"])

            # usage reaches the ledger in batches: until the 25 answers are in,
            # then a moment more, in which the refusals must not show up
            await wait_for(lambda: _at_least(counted, 25), limit=20)
            await trio.sleep(1.5)
            requests = await counted()

    answers = []
    for choice in got["schema"]:  # 20 of 20 parse and validate
        assert choice.finish_reason == "stop", choice
        value = json.loads(choice.message.content)
        jsonschema.validate(value, CITY)
        answers.append(value)
    assert len({json.dumps(a, sort_keys=True) for a in answers}) > 1  # really sampled
    assert got["object"].choices[0].finish_reason == "stop"
    assert isinstance(json.loads(got["object"].choices[0].message.content), dict)
    streamed = "".join(c.choices[0].delta.content or "" for c in got["streamed"] if c.choices)
    jsonschema.validate(json.loads(streamed), CITY)
    weather = got["parsed"].choices[0].message.parsed
    assert isinstance(weather, Weather) and -60 <= weather.temperature_c <= 60
    whole = got["ollama_schema"]
    jsonschema.validate(json.loads(whole.message.content), CITY)
    # a whole (non-streamed) answer reports the model's own timings: clients
    # show eval_count / eval_duration as tokens per second
    assert whole.eval_duration > 0 and whole.prompt_eval_duration > 0
    assert 1 < whole.eval_count / (whole.eval_duration / 1e9) < 10_000
    assert whole.total_duration >= whole.eval_duration
    assert isinstance(json.loads(got["ollama_json"].response), dict)

    missing, bad_schema = got["errors"]
    assert missing.status_code == 400
    assert missing.body["code"] == "missing_capability"
    assert "JSON output" in missing.body["message"] and "fake" in missing.body["message"]
    assert bad_schema.status_code == 400 and bad_schema.body["code"] == "invalid_params"
    assert "not a valid JSON Schema" in bad_schema.body["message"]
    assert got["ollama_error"].status_code == 400
    assert "JSON output" in got["ollama_error"].error
    # the refusals were not counted against the user: 25 answers were
    assert requests == 25


def test_the_format_contract() -> None:
    """What the RPC, REST and both dialects accept as ``format``."""
    def fmt(value: Any) -> OutputFormat | None:
        return parse_prompt_params({"prompt": "x", "format": value}).params.format

    assert fmt("text") is None and fmt({"type": "text"}) is None
    assert fmt("json") == OutputFormat() == fmt({"type": "json"})
    schema = fmt({"type": "json_schema", "schema": CITY, "name": "city", "strict": True})
    assert schema == OutputFormat(schema=CITY, name="city", strict=True)
    assert schema.check('{"city": "Oslo", "country": "Norway", '
                        '"population_millions": 1, "coastal": true}')["city"] == "Oslo"
    with pytest.raises(ValueError, match="does not match the schema"):
        schema.check('{"city": "Oslo"}')
    with pytest.raises(ValueError, match="not an object"):
        OutputFormat().check("[1, 2]")
    for value, field, message in (
        (7, "format", 'must be "json" or a map'),
        ({"type": "xml"}, "format.type", "must be text, json or json_schema"),
        ({"type": "json_schema"}, "format.schema", "must be a JSON Schema"),
        ({"type": "json_schema", "schema": {"type": 3}}, "format.schema",
         "not a valid JSON Schema"),
        ({"type": "json_schema", "schema": {"a": "x" * 20_000}}, "format.schema",
         "at most 16384 bytes"),
        ({"type": "json_schema", "schema": {}, "name": "a b"}, "format.name", "1 to 64"),
        ({"type": "json_schema", "schema": {}, "strict": "yes"}, "format.strict", "true or"),
        ({"type": "json_schema", "schema": {}, "grammar": "x"}, "format.grammar", "unknown"),
    ):
        with pytest.raises(errors.InvalidParams, match=message) as info:
            fmt(value)
        assert info.value.data["field"] == field
    # the cache tells formats apart
    plain = parse_prompt_params({"prompt": "x", "seed": 1}).params
    assert plain.to_dict() != parse_prompt_params(
        {"prompt": "x", "seed": 1, "format": "json"}).params.to_dict()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSwarm]:
    """A hub and one worker serving SmolLM2 (llama.cpp) beside a synthetic model."""
    fake = {"name": FAKE_NAME, "backend": "synthetic", "tokens": 6}
    bg = BackgroundSwarm(tmp_path_factory.mktemp("structured"),
                         extra={"models": [fake, {**SMOLLM2, "default": False}]}).start()
    try:
        yield bg
    finally:
        bg.stop()


def test_the_sdk_and_the_cli_ask_for_json(swarm: BackgroundSwarm, tmp_path: Path) -> None:
    user = swarm.account("sam")
    with SyncClient(bootstrap=[swarm.addr], api_key=user["api_key"]) as client:
        client.wait_for_model("smollm2")
        answer = client.inference("Describe Lima.", model="smollm2", max_tokens=120,
                                  temperature=0.5, format=CITY)
        jsonschema.validate(answer.json(), CITY)
        with client.stream("Give the name and age of a person as JSON.", model="smollm2",
                           max_tokens=200, temperature=0, format="json") as stream:
            streamed = "".join(stream)
        assert isinstance(json.loads(streamed), dict)
        with pytest.raises(errors.MissingCapability) as info:
            client.inference("x", model=FAKE_NAME, format="json")
        assert info.value.data == {"capability": "json", "model": FAKE_NAME}
        listed = {m["name"]: m["capabilities"] for m in client.models()}
        assert listed == {FAKE_NAME: ["chat", "complete"],
                          "smollm2": ["chat", "complete", "json", "logprobs", "tools"]}

    CredentialStore().save(Credentials(bootstrap=[swarm.addr], username="sam",
                                       api_key=user["api_key"], api_key_id=user["key_id"]))
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps(CITY))
    out = invoke("prompt", "-m", "smollm2", "--max-tokens", "120", "--schema", str(schema),
                 "Describe Accra.")
    jsonschema.validate(json.loads(out.stdout), CITY)
    out = invoke("prompt", "-m", "smollm2", "--max-tokens", "200", "-t", "0", "--format",
                 "json", "A person, as JSON.")
    assert isinstance(json.loads(out.stdout), dict)
    out = invoke("prompt", "-m", FAKE_NAME, "--format", "json", "x", code=EXIT_USAGE)
    assert "cannot do JSON output" in out.stderr and "p2pinfer models" in out.stderr
    schema.write_text("[1]")
    out = invoke("prompt", "--schema", str(schema), "x", code=EXIT_USAGE)
    assert "a JSON schema is an object" in out.output
    out = invoke("models")
    assert "chat, complete, json" in out.stdout
    data = json.loads(invoke("prompt", "-m", "smollm2", "--raw", "--max-tokens", "8", "-t", "0",
                             "--json", "The capital of France is").stdout)
    assert data["usage"]["prompt_tokens"] <= 8 and "Paris" in data["text"]


def test_each_backend_asks_its_server_for_the_format() -> None:
    """What goes to llama-server, an OpenAI-compatible server and Ollama."""
    from p2pinfer.inference.backend import GenerationRequest
    from p2pinfer.inference.llamacpp import LlamaCppBackend, LlamaCppOptions
    from p2pinfer.inference.ollama import OllamaBackend
    from p2pinfer.inference.openai import OpenAIBackend
    from p2pinfer.prompts import GenerationParams, Message

    def ask(fmt: OutputFormat) -> GenerationRequest:
        return GenerationRequest((Message("user", "x"),), GenerationParams(format=fmt))

    schema = OutputFormat(schema=CITY, name="city", strict=True)
    llama = LlamaCppBackend("smollm2", LlamaCppOptions(path=Path("/nonexistent.gguf")))
    openai_backend = OpenAIBackend("remote")
    ollama_backend = OllamaBackend("remote")
    assert llama.request_body(ask(schema))["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    # llama-server reads a bare json_object as any JSON value
    assert llama.request_body(ask(OutputFormat()))["response_format"] == {
        "type": "json_object", "schema": {"type": "object"}}
    assert openai_backend.request_body(ask(OutputFormat()))["response_format"] == {
        "type": "json_object"}
    assert ollama_backend.request_body(ask(schema))["format"] == CITY
    assert ollama_backend.request_body(ask(OutputFormat()))["format"] == "json"
    assert "response_format" not in llama.request_body(GenerationRequest((Message("user", "x"),)))
    assert {"json"} <= llama.capabilities and "json" not in FAKE_CAPS


async def test_legacy_completions_continue_the_prompt_as_it_is(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """``/v1/completions``, Ollama's ``raw`` and the SDK's ``raw`` send the
    prompt to the model without its chat template: the model continues the
    text (SmolLM2's template alone adds a 30-token system prompt)."""
    text = "The capital of France is"
    with trio.fail_after(180):
        async with web_swarm(nursery, tmp_path, models=(SMOLLM2,)) as swarm:
            alice = await swarm.account("alice")
            client = openai_client(swarm.url, alice.api_key)
            oll = ollama.Client(host=swarm.url, headers={"Authorization":
                                                         f"Bearer {alice.api_key}"})

            def session() -> dict[str, Any]:
                return {
                    "completion": client.completions.create(
                        model="smollm2", prompt=text, max_tokens=8, temperature=0),
                    "streamed": list(client.completions.create(
                        model="smollm2", prompt=text, max_tokens=8, temperature=0,
                        stream=True, stream_options={"include_usage": True})),
                    "chat": client.chat.completions.create(
                        model="smollm2", messages=[{"role": "user", "content": text}],
                        max_tokens=8, temperature=0),
                    "ollama": oll.generate(model="smollm2", prompt=text, raw=True,
                                           options={"num_predict": 8, "temperature": 0}),
                }

            got = await trio.to_thread.run_sync(session)
            with trio.fail_after(60):
                async with Client(bootstrap=[swarm.node.addrs[0]],
                                  api_key=alice.api_key) as sdk:
                    answer = await sdk.inference(text, model="smollm2", max_tokens=8,
                                                 temperature=0, raw=True)
                    with pytest.raises(errors.InvalidParams, match="only with prompt alone"):
                        await sdk.inference(text, system="Be brief.", raw=True)

    completion = got["completion"]
    continued = completion.choices[0].text
    prompt_tokens = completion.usage.prompt_tokens
    assert prompt_tokens <= 8 < got["chat"].usage.prompt_tokens - 20  # no template
    assert "Paris" in continued, continued
    streamed = "".join(c.choices[0].text for c in got["streamed"] if c.choices)
    assert streamed == continued  # greedy: the same continuation either way
    assert got["streamed"][-1].usage.prompt_tokens == prompt_tokens
    assert got["ollama"].response == continued
    assert got["ollama"].prompt_eval_count == prompt_tokens
    assert answer.text == continued and answer.usage["prompt_tokens"] == prompt_tokens
