"""The official ``openai`` Python package, unchanged, against a p2pinfer
node: list models, a chat completion, a streamed one (with the usage
chunk), a legacy completion, and its errors; then the same dialect's edge
cases over plain HTTP.

The ``openai`` client is synchronous (httpx in the calling thread), so it
runs in a worker thread while trio serves the node.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import trio

from p2pinfer.errors import InvalidParams
from p2pinfer.web.openai_api import chat_request, completion_request

from .test_web_support import web_swarm


def openai_client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


async def test_the_openai_package_lists_chats_and_streams(tmp_path: Path,
                                                          nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        async with web_swarm(nursery, tmp_path) as swarm:
            alice = await swarm.account("alice")
            client = openai_client(swarm.url, alice.api_key)

            def session() -> dict[str, Any]:
                out: dict[str, Any] = {}
                out["models"] = [m.id for m in client.models.list()]
                out["created"] = [m.created for m in client.models.list()]
                out["model"] = client.models.retrieve("fake").id
                chat = client.chat.completions.create(
                    model="fake", messages=[{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Say hello"}],
                    max_tokens=4, temperature=0)
                out["chat"] = chat
                out["three"] = client.chat.completions.create(
                    model="fake", messages=[{"role": "user", "content": "Say hello"}],
                    max_tokens=4, n=3, seed=1)
                out["three_streamed"] = list(client.chat.completions.create(
                    model="fake", messages=[{"role": "user", "content": "Say hello"}],
                    max_tokens=4, n=3, seed=1, stream=True,
                    stream_options={"include_usage": True}))
                chunks = list(client.chat.completions.create(
                    model="fake", messages=[{"role": "user", "content": "Say hello"}],
                    max_tokens=4, temperature=0, stream=True,
                    stream_options={"include_usage": True}))
                out["chunks"] = chunks
                out["completion"] = client.completions.create(model="fake", prompt="Once upon",
                                                              max_tokens=3)
                out["plain_stream"] = list(client.completions.create(
                    model="fake", prompt="Once upon", max_tokens=3, stream=True))
                for call in (lambda: client.chat.completions.create(
                                 model="gpt-5", messages=[{"role": "user", "content": "x"}]),
                             lambda: openai_client(swarm.url, "p2p_bad").models.list(),
                             lambda: client.chat.completions.create(
                                 model="fake", messages=[{"role": "user", "content": "x"}],
                                 n=9)):
                    try:
                        call()
                    except openai.APIStatusError as exc:
                        out.setdefault("errors", []).append(exc)
                return out

            got = await trio.to_thread.run_sync(session)

    assert got["models"] == ["fake"] and got["model"] == "fake"
    # when its worker started serving it (a GGUF model: its file's time)
    assert all(time.time() - 3600 < c <= time.time() for c in got["created"])
    chat = got["chat"]
    assert chat.object == "chat.completion" and chat.model == "fake"
    assert chat.choices[0].message.role == "assistant"
    assert len(chat.choices[0].message.content.split()) == 4
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 4
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 4

    chunks = got["chunks"]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 4
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "length" and set(finish[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")

    completion = got["completion"]
    assert completion.object == "text_completion" and len(completion.choices[0].text.split()) == 3
    assert "".join(c.choices[0].text for c in got["plain_stream"]).split() == \
        completion.choices[0].text.split()

    unknown, bad_key, several = got["errors"]
    assert isinstance(unknown, openai.NotFoundError)
    assert unknown.body["type"] == "invalid_request_error" and unknown.body["code"] == \
        "unknown_model"
    assert isinstance(bad_key, openai.AuthenticationError)
    assert bad_key.body["type"] == "authentication_error"
    assert isinstance(several, openai.BadRequestError) and several.body["param"] == "n"
    assert "from 1 to 8" in several.body["message"]
    # n choices: n requests, run at once; usage is their sum
    three = got["three"]
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert all(len(c.message.content.split()) == 4 for c in three.choices)
    # seeds 1, 2, 3: reproducible, not identical
    assert len({c.message.content for c in three.choices}) > 1
    assert three.usage.completion_tokens == 12
    assert three.usage.prompt_tokens == 3 * (2 + 3)  # "Say hello" + the template, thrice
    # streamed: the three choices interleaved, each chunk naming its index;
    # the same seeds, so the same answers as whole
    streamed: dict[int, str] = {0: "", 1: "", 2: ""}
    finished: dict[int, str] = {}
    for chunk in got["three_streamed"]:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert [streamed[i] for i in range(3)] == [c.message.content for c in three.choices]
    assert finished == {0: "length", 1: "length", 2: "length"}
    assert got["three_streamed"][-1].usage.completion_tokens == 12


async def test_openai_dialect_over_http(tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        async with web_swarm(nursery, tmp_path, gateway={"default_rate_limit": 4}) as swarm:
            alice = await swarm.account("alice")
            headers = {"Authorization": f"Bearer {alice.api_key}"}
            async with swarm.client(headers=headers) as http:
                # content as text parts, the developer role, max_completion_tokens
                r = await http.post("/v1/chat/completions", json={
                    "model": "fake", "max_completion_tokens": 2, "user": "u-1",
                    "messages": [{"role": "developer", "content": "Be brief."},
                                 {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]})
                assert r.status_code == 200 and r.headers["x-request-id"]
                assert r.json()["usage"]["completion_tokens"] == 2
                # a stream without include_usage has no usage chunk
                r = await http.post("/v1/chat/completions", json={
                    "model": "fake", "stream": True,
                    "messages": [{"role": "user", "content": "Hi"}]})
                assert r.headers["content-type"].startswith("text/event-stream")
                events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                assert all("usage" not in json.loads(e) for e in events[:-1])
                # refused, not ignored: tools on a model that cannot call them
                r = await http.post("/v1/chat/completions", json={
                    "model": "fake", "tools": [{"type": "function", "function": {"name": "f"}}],
                    "messages": [{"role": "user", "content": "Hi"}]})
                assert r.status_code == 400
                assert r.json()["error"]["code"] == "missing_capability"
                # the rate limit: 429, rate_limit_error, Retry-After
                for _ in range(3):
                    await http.post("/v1/completions", json={"model": "fake", "prompt": "x"})
                r = await http.post("/v1/completions", json={"model": "fake", "prompt": "x"})
                assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["type"] == "rate_limit_error"
                # no credential at all
                r = await http.get("/v1/models", headers={"Authorization": ""})
                assert r.status_code == 401
                assert r.json()["error"]["type"] == "authentication_error"


def test_openai_request_translation() -> None:
    params, stream, usage = chat_request({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
        "stop": ["\n"], "seed": 3, "stream": True, "stream_options": {"include_usage": True},
        "frequency_penalty": 0, "logprobs": False, "n": 1})
    assert params == {"model": "m", "max_tokens": 5, "stop": ["\n"], "seed": 3,
                      "messages": [{"role": "user", "content": "hi"}]}
    assert stream is True and usage is True
    params, _, _ = chat_request({"messages": [{"role": "user", "content": "x"}],
                                 "response_format": {"type": "json_schema", "json_schema": {
                                     "name": "a", "strict": True, "schema": {"type": "object"}}}})
    assert params["format"] == {"type": "json_schema", "schema": {"type": "object"},
                                "name": "a", "strict": True}
    params, _, _ = chat_request({"messages": [{"role": "user", "content": "x"}],
                                 "response_format": {"type": "json_object"}})
    assert params["format"] == "json"
    params, stream, usage = completion_request({"prompt": ["one"], "temperature": 0.5})
    assert params == {"prompt": "one", "temperature": 0.5, "raw": True} and not stream and not usage
    for body, field in (({"messages": []}, "messages"),
                        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                         "messages[0].content[0]"),
                        ({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1},
                         "presence_penalty"),
                        ({"messages": [{"role": "user", "content": "x"}], "wat": 1}, "wat"),
                        ({"messages": [{"role": "user", "content": "x"}],
                          "response_format": {"type": "xml"}}, "response_format.type"),
                        ({"messages": [{"role": "user", "content": "x"}],
                          "response_format": {"type": "json_schema"}},
                         "response_format.json_schema")):
        with pytest.raises(InvalidParams) as ei:
            chat_request(body)
        assert ei.value.data["field"] == field
