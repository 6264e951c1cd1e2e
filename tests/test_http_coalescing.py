"""The HTTP backends send a request's head and body in one write
(:func:`p2pinfer.inference.remote.coalesce_writes`): on a real httpx2
client, with a real server and through a real proxy, and at the level of
one connection."""

from __future__ import annotations

import functools
from typing import Any

import httpcore2
import httpx2
import pytest
import trio

from p2pinfer.inference import remote
from p2pinfer.inference.remote import COALESCE_LIMIT, coalesce_writes


class Recording(httpcore2.AsyncNetworkStream):
    """A connection that records each write it is asked for."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        return b"HTTP/1.1 200 OK\r\n"

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        self.writes.append(buffer)

    async def aclose(self) -> None:
        self.closed = True


async def test_writes_wait_for_the_read() -> None:
    inner = Recording()
    stream = remote._CoalescingStream(inner)
    await stream.write(b"POST / HTTP/1.1\r\n\r\n")
    await stream.write(b"")
    await stream.write(b'{"a":1}')
    assert inner.writes == []
    assert await stream.read(100) == b"HTTP/1.1 200 OK\r\n"
    assert inner.writes == [b'POST / HTTP/1.1\r\n\r\n{"a":1}']
    await stream.read(100)  # nothing held: nothing written
    assert len(inner.writes) == 1


async def test_a_large_body_leaves_in_pieces_and_close_drops_what_is_held() -> None:
    inner = Recording()
    stream = remote._CoalescingStream(inner)
    piece = b"x" * (COALESCE_LIMIT // 2 + 1)
    await stream.write(piece)
    assert inner.writes == []
    await stream.write(piece)  # over the limit: sent without waiting
    assert inner.writes == [piece + piece]
    await stream.write(b"tail")
    await stream.aclose()
    assert inner.closed and inner.writes == [piece + piece]


def _pools(client: httpx2.AsyncClient) -> list[Any]:
    return [t._pool for t in (client._transport, *client._mounts.values())  # type: ignore[attr-defined]
            if t is not None]


async def test_every_pool_of_a_client_is_changed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with httpx2.AsyncClient() as client:
        assert coalesce_writes(client) == 2  # its own pool and the proxy's
        assert coalesce_writes(client) == 0
        assert all(isinstance(p._network_backend, remote._CoalescingBackend)
                   for p in _pools(client))
    # a test double has no pool: left as it is
    async with httpx2.AsyncClient(transport=httpx2.MockTransport(
            lambda r: httpx2.Response(200))) as client:
        assert coalesce_writes(client) == 0
        assert (await client.get("http://example.test/")).status_code == 200


async def test_a_real_server_gets_the_request_in_one_piece(nursery: trio.Nursery) -> None:
    """A server that reads once, as soon as anything arrives: the head and
    the body are there together, and the answer comes back whole; a
    second request reuses the connection."""
    firsts: list[bytes] = []
    connections = 0

    async def serve(conn: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        async with conn:
            while True:
                data = await conn.receive_some(65536)
                if not data:
                    return
                firsts.append(data)
                while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                    more = await conn.receive_some(65536)
                    if not more:
                        return
                    data += more
                await conn.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"
                                    b"content-type: application/json\r\n\r\n{}")

    listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0,
                                                      host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    async with httpx2.AsyncClient(trust_env=False) as client:
        assert coalesce_writes(client) == 1
        for _ in range(2):
            r = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                  json={"model": "m", "messages": [{"role": "user",
                                                                    "content": "hi"}]})
            assert r.json() == {}
    assert connections == 1 and len(firsts) == 2
    for first in firsts:
        head, _, body = first.partition(b"\r\n\r\n")
        assert head.startswith(b"POST /v1/chat/completions") and body.endswith(b"}")
