"""The HTTP backends' clients (:class:`p2pinfer.inference.remote.ClientLanes`):
one connection a lane, one request a lane at a time, kept between requests,
closed when unused for the keep-alive expiry or when the backend stops; on
a real server that counts its connections."""

from __future__ import annotations

import functools
import json
import re
from contextlib import aclosing
from typing import Any

import pytest
import trio

from p2pinfer.inference import InferenceEngine, TextChunk
from p2pinfer.inference.openai import OpenAIBackend
from p2pinfer.inference.remote import ClientLanes
from p2pinfer.prompts import parse_prompt_params

MODELS = json.dumps({"object": "list", "data": [{"id": "remote"}]}).encode()
EVENTS = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in (
    {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
)) + b"data: [DONE]\n\n"


class Server:
    """An OpenAI-compatible server on a real socket: answers ``Hi`` to each
    chat completion, counts connections and the requests on each, and sees
    each connection's end. With ``hold`` it answers no completion until
    that many are waiting at once; with ``stall`` it sends the first event
    and then nothing."""

    def __init__(self, *, hold: int = 0, stall: bool = False) -> None:
        self.hold = hold
        self.stall = stall
        self.requests: list[int] = []  # per connection
        self.closed = 0
        self.changed = trio.Event()  # a connection ended
        self.waiting = 0
        self.all_waiting = trio.Event()
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> str:
        listeners = await nursery.start(functools.partial(
            trio.serve_tcp, self.handle, 0, host="127.0.0.1"))
        self.port = int(listeners[0].socket.getsockname()[1])
        return f"http://127.0.0.1:{self.port}/v1"

    async def handle(self, stream: trio.SocketStream) -> None:
        me = len(self.requests)
        self.requests.append(0)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                sized = re.search(rb"(?i)content-length: *(\d+)", head)
                length = int(sized.group(1)) if sized else 0
                while len(buf) < length:
                    buf += await stream.receive_some(65536)
                buf = buf[length:]
                if head.startswith(b"GET"):
                    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json"
                                          b"\r\ncontent-length: %d\r\n\r\n" % len(MODELS)
                                          + MODELS)
                    continue
                self.requests[me] += 1
                if self.hold:
                    self.waiting += 1
                    if self.waiting >= self.hold:
                        self.all_waiting.set()
                    await self.all_waiting.wait()
                    self.waiting -= 1
                    if not self.waiting:
                        self.all_waiting = trio.Event()
                head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                        b"transfer-encoding: chunked\r\n\r\n")
                if self.stall:
                    first = EVENTS.split(b"\n\n")[0] + b"\n\n"
                    await stream.send_all(head + b"%x\r\n" % len(first) + first + b"\r\n")
                    while await stream.receive_some(65536):  # until the client leaves
                        pass
                    return
                await stream.send_all(head + b"%x\r\n" % len(EVENTS) + EVENTS
                                      + b"\r\n0\r\n\r\n")
        except trio.BrokenResourceError:
            return
        finally:
            self.closed += 1
            self.changed.set()
            self.changed = trio.Event()

    async def until_closed(self, n: int) -> None:
        """Until ``n`` connections have ended."""
        while self.closed < n:
            await self.changed.wait()


async def at_once(engine: InferenceEngine, n: int) -> list[list[str]]:
    """``n`` answers asked at the same time."""
    answers: list[list[str]] = []

    async def one() -> None:
        answers.append(await ask(engine))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
    return answers


async def ask(engine: InferenceEngine) -> list[str]:
    chunks: list[str] = []
    async with aclosing(engine.generate(parse_prompt_params({"prompt": "hello"}))) as events:
        async for event in events:
            if isinstance(event, TextChunk):
                chunks.append(event.text)
    return chunks


async def started(nursery: trio.Nursery, url: str, slots: int = 4,
                  ) -> tuple[OpenAIBackend, InferenceEngine, trio.CancelScope]:
    backend = OpenAIBackend("remote", base_url=url, slots=slots, probe_interval=3600)
    engine = InferenceEngine()
    engine.add_model(backend)
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await engine.run(task_status=task_status)

    await nursery.start(run)
    with trio.fail_after(10):
        assert await engine.wait_settled() == {"remote": "loaded"}
    return backend, engine, scope


async def test_answers_at_once_each_have_a_connection_and_keep_it(
        nursery: trio.Nursery) -> None:
    """Four answers at a time, three times over: four connections, each
    carrying three answers (the probe's GET went on one of them too)."""
    server = Server(hold=4)
    backend, engine, _ = await started(nursery, await server.start(nursery))
    for _ in range(3):
        assert await at_once(engine, 4) == [["Hi"]] * 4
    assert sorted(server.requests) == [3, 3, 3, 3]
    assert backend._lanes is not None and len(backend._lanes) == 4


async def test_a_cancelled_answer_gives_its_lane_back(nursery: trio.Nursery) -> None:
    """A caller that leaves mid-answer: the connection is dropped (the
    server sees it end), the lane is not, and the next answer on it opens
    a new connection."""
    server = Server(stall=True)
    backend, engine, _ = await started(nursery, await server.start(nursery), slots=1)
    with trio.move_on_after(0.5) as waited:
        await ask(engine)
    assert waited.cancelled_caught
    with trio.fail_after(5):
        await server.until_closed(1)
    server.stall = False
    with trio.fail_after(5):
        assert await ask(engine) == ["Hi"]
    assert backend._lanes is not None and len(backend._lanes) == 1
    assert server.requests == [1, 1]


async def test_unused_lanes_close_with_their_connections(nursery: trio.Nursery) -> None:
    """Lanes unused for the expiry are closed by the sweep (their server
    side sees the connection end); a lane in use is kept."""
    server = Server()
    url = await server.start(nursery)
    import httpx2

    lanes = ClientLanes(lambda: httpx2.AsyncClient(base_url=url + "/", trust_env=False),
                        expiry=0.2)
    nursery.start_soon(lanes.sweep)
    taken = [lanes.take() for _ in range(3)]
    for lane in taken:
        assert (await lane.client.get("models")).status_code == 200
    assert server.requests == [0, 0, 0]  # three connections, no completion
    for lane in taken[:2]:
        lanes.give(lane)
    with trio.fail_after(5):
        await server.until_closed(2)
    assert len(lanes) == 1
    assert (await taken[2].client.get("models")).status_code == 200  # still open
    assert len(server.requests) == 3
    await lanes.aclose()


async def test_stopping_the_backend_closes_every_connection(nursery: trio.Nursery) -> None:
    server = Server(hold=3)
    backend, engine, scope = await started(nursery, await server.start(nursery))
    await at_once(engine, 3)
    assert server.closed == 0
    scope.cancel()
    with trio.fail_after(5):
        await server.until_closed(3)
    assert backend._lanes is None
    assert len(server.requests) == 3


async def test_the_lanes_share_one_tls_context(nursery: trio.Nursery) -> None:
    """Every lane's client verifies TLS with the same context (made once),
    as a default httpx2 client would."""
    server = Server(hold=2)
    backend, engine, _ = await started(nursery, await server.start(nursery))
    await at_once(engine, 2)
    assert backend._lanes is not None
    contexts = {id(pool._ssl_context) for pool in _pools(backend)}
    assert len(contexts) == 1 and backend._ssl is not None
    assert backend._ssl.verify_mode.name == "CERT_REQUIRED" and backend._ssl.check_hostname


def _pools(backend: OpenAIBackend) -> list[Any]:
    assert backend._lanes is not None
    return [lane.client._transport._pool  # type: ignore[attr-defined]
            for lane in backend._lanes._all]


async def test_settings_a_client_refuses_stop_the_backend_at_its_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy URL in the environment that httpx2 cannot use fails the
    backend's start, not each request later."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", "ftp://proxy.example.test")
    backend = OpenAIBackend("remote", base_url="http://127.0.0.1:9/v1", probe_interval=3600)
    with trio.fail_after(5), pytest.raises(BaseExceptionGroup) as failed:
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            nursery.cancel_scope.cancel()  # started: nothing refused it
    assert failed.group_contains(ValueError, match="proxy", depth=1)
    assert backend._lanes is None


async def test_a_request_that_cannot_be_made_takes_no_lane_for_good(
        nursery: trio.Nursery) -> None:
    server = Server()
    backend, engine, _ = await started(nursery, await server.start(nursery))
    with pytest.raises(ValueError):
        async with backend.open_stream("/chat/completions", {"temperature": float("nan")}):
            pass
    assert await ask(engine) == ["Hi"]
    lanes = backend._lanes
    assert lanes is not None and len(lanes) == 1 and len(lanes._free) == 1
