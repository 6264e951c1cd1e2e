"""The OpenAI-compatible backend: against a real llama.cpp server on
loopback, and (for the failure cases) against real sockets that misbehave or
an httpx2 MockTransport."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from functools import partial
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from p2pinfer.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    MalformedBackendResponse,
    Overloaded,
    UnknownModel,
)
from p2pinfer.inference import (
    Completion,
    InferenceEngine,
    OpenAIBackend,
    TextChunk,
    embedded_model_path,
    parse_prompt_params,
)
from p2pinfer.inference.runner import find_llama_server

from .test_http_lanes import Server


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting is refused, and no
    other process can take it while the test runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    """A real llama.cpp ``llama-server`` (the one p2pinfer's own runner uses)
    on 127.0.0.1, started by hand as an operator would run an
    OpenAI-compatible server; yields its /v1 URL.

    It binds port 0 itself and we read the port from its own log, so no
    other process can take the port between choosing and binding it.
    """
    log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log")
    proc = subprocess.Popen(
        [str(find_llama_server()), "-m", str(embedded_model_path()), "-a", "smollm2",
         "--host", "127.0.0.1", "--port", "0", "-c", "2048", "-np", "1", "-t", "1",
         "--no-webui", "--log-colors", "off"],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "LLAMA_API_KEY": "sk-test"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            output = Path(log.name).read_text(errors="replace")
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", output)
            if found:
                break
            if proc.poll() is not None:
                pytest.fail(f"llama-server exited: {output[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("llama-server did not start within 60 s")
            time.sleep(0.05)
        url = found.group(1) + "/v1"
        models = httpx2.get(f"{url}/models", timeout=5,
                           headers={"Authorization": "Bearer sk-test"}).json()
        assert models["data"][0]["id"] == "smollm2"
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def started_engine(nursery: trio.Nursery, backend: OpenAIBackend) -> InferenceEngine:
    engine = InferenceEngine()
    engine.add_model(backend)
    await nursery.start(engine.run)
    return engine


async def ask(engine: InferenceEngine, params: Any,
              on_chunk: Callable[[str], None] | None = None) -> tuple[list[str], Completion]:
    chunks: list[str] = []
    done: Completion | None = None
    async with aclosing(engine.generate(parse_prompt_params(params))) as events:
        async for event in events:
            if isinstance(event, TextChunk):
                chunks.append(event.text)
                if on_chunk:
                    on_chunk(event.text)
            else:
                done = event
    assert done is not None
    return chunks, done


# -- against the real server ------------------------------------------------------------
async def test_streams_from_a_real_llama_cpp_server(llama_server: str,
                                                    nursery: trio.Nursery) -> None:
    backend = OpenAIBackend("remote", base_url=llama_server, remote_model="smollm2",
                            api_key="sk-test")
    engine = await started_engine(nursery, backend)
    arrivals: list[float] = []
    with trio.fail_after(60):
        assert await engine.wait_settled() == {"remote": "loaded"}
        assert [m.name for m in await backend.list_models()] == ["smollm2"]
        chunks, done = await ask(
            engine, {"prompt": "Write a short story about a robot.", "max_tokens": 24,
                     "temperature": 0}, on_chunk=lambda _: arrivals.append(trio.current_time()))
        ended = trio.current_time()
        async with httpx2.AsyncClient(headers={"Authorization": "Bearer sk-test"}) as client:
            plain = (await client.post(f"{llama_server}/chat/completions", json={
                "model": "smollm2", "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": "Write a short story about a robot."}],
            }, timeout=30)).json()
    # Streamed token by token, in order, before the answer ended.
    assert len(chunks) >= 20 and arrivals[0] < arrivals[-1] <= ended
    assert arrivals[-1] - arrivals[0] > 0.05
    assert "".join(chunks) == plain["choices"][0]["message"]["content"]
    assert (done.model, done.backend, done.finish_reason) == ("remote", "openai", "length")
    # This server honours stream_options.include_usage: exact counts.
    assert done.usage_exact
    assert done.completion_tokens == plain["usage"]["completion_tokens"] == 24
    assert done.prompt_tokens == plain["usage"]["prompt_tokens"]
    assert done.prompt_tokens > 0


async def test_stop_and_end_of_answer_on_the_real_server(llama_server: str,
                                                         nursery: trio.Nursery) -> None:
    engine = await started_engine(
        nursery, OpenAIBackend("remote", base_url=llama_server, remote_model="smollm2",
                               api_key="sk-test"))
    with trio.fail_after(60):
        chunks, done = await ask(engine, {"prompt": "Say hi", "max_tokens": 200,
                                          "temperature": 0})
        assert done.finish_reason == "stop" and 0 < done.completion_tokens < 200
        chunks, done = await ask(engine, {"prompt": "Write a short story about a robot.",
                                          "max_tokens": 24, "temperature": 0, "stop": [","]})
    text = "".join(chunks)
    assert text.startswith("In the year") and "," not in text
    assert done.finish_reason == "stop" and done.completion_tokens < 24


# -- misbehaving servers on real sockets -----------------------------------------------------
async def test_backend_down_is_unavailable(nursery: trio.Nursery, refused_port: int) -> None:
    backend = OpenAIBackend("remote", base_url=f"http://127.0.0.1:{refused_port}/v1",
                            probe_interval=3600)
    engine = await started_engine(nursery, backend)
    with trio.fail_after(10):
        assert await engine.wait_settled() == {"remote": "error"}
        with pytest.raises(BackendUnavailable, match="ConnectError"):
            await ask(engine, "hello")
    assert engine.status("remote")["status"] == "error"
    assert engine.status("remote")["free_slots"] == backend.slots


async def silent_server(nursery: trio.Nursery, reply: bytes) -> int:
    """A TCP server that sends ``reply`` and then nothing, forever."""

    async def handle(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        if reply:
            await stream.send_all(reply)
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def test_answers_go_through_the_proxy_the_environment_names(
        nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP_PROXY (as httpx2 reads it) is honoured for answers too, though
    they skip the client: a real proxy socket sees the absolute URLs."""
    seen: list[bytes] = []

    async def proxy(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(65536)
        line = head.split(b"\r\n", 1)[0]
        seen.append(line)
        if b"/models " in line:
            body = json.dumps({"object": "list", "data": [{"id": "gpt-x"}]}).encode()
            kind = b"application/json"
        else:
            body = sse(delta("via proxy", "stop"), "[DONE]")
            kind = b"text/event-stream"
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: " + kind
                              + b"\r\ncontent-length: " + str(len(body)).encode()
                              + b"\r\nconnection: close\r\n\r\n" + body)
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, proxy, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    engine = await started_engine(nursery, OpenAIBackend(
        "remote", base_url="http://models.example.test/v1", remote_model="gpt-x",
        probe_interval=3600))
    with trio.fail_after(10):
        assert await engine.wait_settled() == {"remote": "loaded"}
        chunks, _ = await ask(engine, {"prompt": "hi"})
    assert chunks == ["via proxy"]
    assert seen[-1] == b"POST http://models.example.test/v1/chat/completions HTTP/1.1"


async def test_a_server_that_never_answers_times_out(nursery: trio.Nursery) -> None:
    port = await silent_server(nursery, b"")
    engine = await started_engine(nursery, OpenAIBackend(
        "remote", base_url=f"http://127.0.0.1:{port}/v1", timeout=0.3, probe_interval=3600))
    with trio.fail_after(10), pytest.raises(BackendTimeout):
        await ask(engine, "hello")


async def test_a_stream_that_stalls_mid_answer_times_out(nursery: trio.Nursery) -> None:
    chunk = json.dumps({"choices": [{"delta": {"content": "Hel"}, "finish_reason": None}]})
    reply = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
             b"transfer-encoding: chunked\r\n\r\n")
    event = f"data: {chunk}\n\n".encode()
    reply += f"{len(event):x}\r\n".encode() + event + b"\r\n"
    port = await silent_server(nursery, reply)
    engine = await started_engine(nursery, OpenAIBackend(
        "remote", base_url=f"http://127.0.0.1:{port}/v1", timeout=0.3, probe_interval=3600))
    got: list[str] = []
    with trio.fail_after(10), pytest.raises(BackendTimeout):
        await ask(engine, "hello", on_chunk=got.append)
    assert got == ["Hel"]


async def test_answers_reuse_one_connection_to_the_server(nursery: trio.Nursery) -> None:
    """After an answer's [DONE] the rest of the body (the end of the chunked
    encoding) is read, so the connection is kept: three answers and the
    catalog probe on one TCP connection (each answer opened a new one
    before)."""
    server = Server()
    engine = await started_engine(nursery, OpenAIBackend(
        "remote", base_url=await server.start(nursery), probe_interval=3600))
    with trio.fail_after(10):
        assert await engine.wait_settled() == {"remote": "loaded"}
        for _ in range(3):
            chunks, done = await ask(engine, "hello")
            assert chunks == ["Hi"] and done.completion_tokens == 1
    assert server.requests == [3]


# -- MockTransport: exact failure shapes ------------------------------------------------------
def sse(*events: Any) -> bytes:
    out = b""
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        out += f"data: {data}\n\n".encode()
    return out


def delta(text: str | None = None, finish: str | None = None) -> dict[str, Any]:
    d = {} if text is None else {"content": text}
    return {"id": "x", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


class FakeOpenAI:
    """A MockTransport handler whose answer the test sets."""

    def __init__(self) -> None:
        self.requests: list[httpx2.Request] = []
        self.response = httpx2.Response(200, content=sse(delta("ok", "stop"), "[DONE]"))

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/models"):
            return httpx2.Response(200, json={"object": "list", "data": [{"id": "gpt-x"}]})
        self.requests.append(request)
        return self.response


@pytest.fixture
async def fake(nursery: trio.Nursery) -> AsyncIterator[tuple[FakeOpenAI, InferenceEngine]]:
    handler = FakeOpenAI()
    backend = OpenAIBackend("gpt", base_url="https://api.example.test/v1", api_key="sk-secret",
                            remote_model="gpt-x", transport=httpx2.MockTransport(handler))
    engine = await started_engine(nursery, backend)
    yield handler, engine


async def test_request_shape_and_exact_usage(fake: tuple[FakeOpenAI, InferenceEngine]) -> None:
    handler, engine = fake
    handler.response = httpx2.Response(200, content=sse(
        delta("Hello"), delta(" world"), delta(None, "length"),
        {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2,
                                  "total_tokens": 13}}, "[DONE]"))
    with trio.fail_after(10):
        assert await engine.wait_settled() == {"gpt": "loaded"}
        chunks, done = await ask(engine, {"prompt": "hi", "max_tokens": 2, "temperature": 0.5,
                                          "top_p": 0.9, "stop": ["\n"], "seed": 3})
    assert chunks == ["Hello", " world"]
    assert (done.prompt_tokens, done.completion_tokens, done.finish_reason) == (11, 2, "length")
    assert done.usage_exact
    sent = handler.requests[0]
    assert str(sent.url) == "https://api.example.test/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-secret"
    assert json.loads(sent.content) == {
        "model": "gpt-x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "temperature": 0.5, "top_p": 0.9, "stream": True,
        "stream_options": {"include_usage": True}, "stop": ["\n"], "seed": 3}


async def test_credentials_in_the_url_are_sent_as_basic_auth(nursery: trio.Nursery) -> None:
    """``http://user:key@host`` (how a worker reaches another swarm's HTTP
    front door): every request, the answers too, carries them as HTTP Basic,
    and messages never show them."""
    handler = FakeOpenAI()
    backend = OpenAIBackend("gpt", base_url="https://p2p:sk-in-url@api.example.test/v1",
                            remote_model="gpt-x", transport=httpx2.MockTransport(handler))
    engine = await started_engine(nursery, backend)
    with trio.fail_after(10):
        assert await engine.wait_settled() == {"gpt": "loaded"}
        await ask(engine, {"prompt": "hi"})
    sent = handler.requests[0]
    assert sent.headers["authorization"] == "Basic " + base64.b64encode(b"p2p:sk-in-url").decode()
    assert "sk-in-url" not in backend.where


async def test_lines_split_anywhere_and_any_line_ending_are_read_whole(
        fake: tuple[FakeOpenAI, InferenceEngine]) -> None:
    """The stream is read at the transport, so its lines are ours to split:
    pieces cut anywhere (inside a \\r\\n, inside a UTF-8 character) with
    CRLF, LF and lone CR endings give the same answer."""
    handler, engine = fake
    body = sse(delta("Héllo"), delta(" wörld"), delta(None, "stop"), "[DONE]")
    for ending in (b"\r\n", b"\r"):
        variant = body.replace(b"\n", ending)

        async def pieces(data: bytes = variant) -> AsyncIterator[bytes]:
            for i in range(0, len(data), 3):
                yield data[i:i + 3]

        handler.response = httpx2.Response(200, content=pieces())
        with trio.fail_after(10):
            assert await engine.wait_settled() == {"gpt": "loaded"}
            chunks, done = await ask(engine, {"prompt": "hi"})
        assert chunks == ["Héllo", " wörld"] and done.finish_reason == "stop"


@pytest.mark.parametrize(
    "response, error, check",
    [
        (httpx2.Response(500, json={"error": {"message": "boom inside"}}), BackendError,
         lambda e: e.data["status"] == 500 and "boom inside" in e.message),
        (httpx2.Response(401, json={"error": {"message": "bad key"}}), BackendError,
         lambda e: e.data["status"] == 401),
        (httpx2.Response(404, json={"error": {"message": "no such model"}}), UnknownModel,
         lambda e: e.data["model"] == "gpt"),
        (httpx2.Response(429, headers={"retry-after": "7"}, text="slow down"), Overloaded,
         lambda e: e.retry_after == 7.0),
        (httpx2.Response(503, text="maintenance"), BackendUnavailable, lambda e: True),
        (httpx2.Response(504, text="gateway timeout"), BackendTimeout, lambda e: True),
        (httpx2.Response(200, content=b"data: {not json\n\n"), MalformedBackendResponse,
         lambda e: "not JSON" in e.message),
        (httpx2.Response(200, content=sse(delta("Hel"))), MalformedBackendResponse,
         lambda e: "[DONE]" in e.message),
        (httpx2.Response(200, content=sse({"object": "chunk"}, "[DONE]")),
         MalformedBackendResponse, lambda e: "choices" in e.message),
        (httpx2.Response(200, content=sse({"choices": [{"delta": {"content": 5}}]}, "[DONE]")),
         MalformedBackendResponse, lambda e: "not text" in e.message),
        (httpx2.Response(200, content=sse({"error": {"message": "overheated"}})), BackendError,
         lambda e: "overheated" in e.message),
        (httpx2.Response(200, content=sse(delta("a"), {"choices": [], "usage": {
            "prompt_tokens": -1, "completion_tokens": 1}}, "[DONE]")),
         MalformedBackendResponse, lambda e: "prompt_tokens" in e.message),
    ],
)
async def test_each_failure_is_a_specific_error_and_the_backend_recovers(
        fake: tuple[FakeOpenAI, InferenceEngine], response: httpx2.Response,
        error: type[Exception], check: Callable[[Any], bool]) -> None:
    handler, engine = fake
    handler.response = response
    with trio.fail_after(10):
        with pytest.raises(error) as ei:
            await ask(engine, "hi")
        assert check(ei.value), ei.value
        assert "sk-secret" not in str(ei.value)
        assert engine.status("gpt")["free_slots"] == 4
        handler.response = httpx2.Response(200, content=sse(delta("fine", "stop"), "[DONE]"))
        chunks, done = await ask(engine, "hi")
    assert chunks == ["fine"] and done.finish_reason == "stop"
    assert engine.status("gpt")["requests"] == {
        "success": 1, "error": 1, "cancelled": 0, "overloaded": 0, "cached": 0}


async def test_a_server_without_stream_usage_gets_estimates_that_say_so(
        fake: tuple[FakeOpenAI, InferenceEngine]) -> None:
    """Some OpenAI-compatible servers ignore stream_options.include_usage:
    one token per delta and ~4 characters a prompt token stand in, marked
    inexact."""
    handler, engine = fake
    handler.response = httpx2.Response(200, content=sse(
        delta("Hello"), delta(" there"), delta(" friend", "stop"), "[DONE]"))
    with trio.fail_after(10):
        chunks, done = await ask(engine, {"prompt": "hello there", "max_tokens": 8})
    assert "".join(chunks) == "Hello there friend"
    assert not done.usage_exact and done.completion_tokens == 3 and done.prompt_tokens > 0
