"""The node's RPC on a unix socket: a trio RpcServer served by serve_local in a
background thread, called by the asyncio AioRpcClient (as an HTTP worker
process would call its node)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
import trio
import trio.lowlevel

from p2pinfer import errors
from p2pinfer.rpc import CallContext, RpcServer
from p2pinfer.rpc.aio import AioRpcClient, WouldBlock
from p2pinfer.rpc.local_socket import serve_local
from p2pinfer.tracing import current_request_id

NODE_ID = "12D3KooWLocalNodeItself"
T = TypeVar("T")


class Service:
    """Handlers that report to the test thread through threading events."""

    def __init__(self) -> None:
        self.endless_closed = threading.Event()
        self.slow_started = threading.Event()
        self.slow_cancelled = threading.Event()
        self.slow_remaining: list[float | None] = []
        self.max_lead = 0  # chunks produced beyond what the client has read

    async def rpc_echo(self, ctx: CallContext, params: Any) -> Any:
        return {"params": params, "peer": ctx.peer_id, "member": ctx.is_member,
                "rid": ctx.request_id, "rid_var": current_request_id.get()}

    async def rpc_reject(self, ctx: CallContext, params: Any) -> Any:
        raise errors.InvalidParams("max_tokens must be positive", data={"field": "max_tokens"})

    async def rpc_boom(self, ctx: CallContext, params: Any) -> Any:
        raise ValueError("internal detail")

    async def rpc_big(self, ctx: CallContext, params: Any) -> Any:
        return b"x" * int(params)

    async def rpc_count(self, ctx: CallContext, params: Any) -> AsyncIterator[int]:
        for i in range(int(params)):
            yield i
        ctx.trailer = {"total": int(params)}

    async def rpc_endless(self, ctx: CallContext, params: Any) -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
                await trio.lowlevel.checkpoint()
        finally:
            self.endless_closed.set()

    async def rpc_slow(self, ctx: CallContext, params: Any) -> Any:
        self.slow_remaining.append(ctx.remaining())
        self.slow_started.set()
        try:
            await trio.sleep(30)
        finally:
            self.slow_cancelled.set()


class LocalNode:
    """A trio event loop in a thread, serving ``Service`` on a unix socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.service = Service()
        self.server = RpcServer(is_member=lambda peer: peer == NODE_ID, stall_timeout=2.0)
        self.server.register(self.service)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._scope: trio.CancelScope | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_local, self.server, self.path, NODE_ID)
                self._ready.set()

    def start(self) -> LocalNode:
        self._thread.start()
        assert self._ready.wait(10), "the node did not start"
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._thread.is_alive() and self._scope is not None:
            assert self._token is not None
            try:
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(10)
        assert not self._thread.is_alive()


@pytest.fixture
def sock_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def node(sock_dir: Path) -> Iterator[LocalNode]:
    n = LocalNode(sock_dir / "node.sock").start()
    yield n
    n.stop()


def run(coro_fn: Callable[[], Awaitable[T]], *, timeout: float = 20) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)  # type: ignore[arg-type]

    return asyncio.run(bounded())


async def wait_event(event: threading.Event, seconds: float) -> bool:
    return await asyncio.to_thread(event.wait, seconds)


def test_unary_round_trip(node: LocalNode) -> None:
    async def main() -> None:
        async with await AioRpcClient.connect(node.path) as client:
            params = {"x": [1, b"\x00\xff", None, 2.5], "s": "é", "n": {"deep": [True]}}
            out = await client.call("echo", params)
            assert out["params"] == params
            # served as a call from the node itself, a member
            assert out["peer"] == NODE_ID and out["member"] is True
            assert (await client.call("echo"))["params"] is None
            assert await client.call("big", 10) == b"x" * 10
        assert client.closed
        await asyncio.wait_for(client.wait_closed(), 1)

    run(main)


def test_errors_keep_class_code_and_data(node: LocalNode) -> None:
    async def main() -> None:
        async with await AioRpcClient.connect(node.path) as client:
            with pytest.raises(errors.InvalidParams) as info:
                await client.call("reject", {})
            assert info.value.code == 1100
            assert info.value.data == {"field": "max_tokens"}
            assert "max_tokens must be positive" in info.value.message
            with pytest.raises(errors.HandlerError) as boom:
                await client.call("boom")
            assert "internal detail" not in boom.value.message
            with pytest.raises(errors.UnknownMethod):
                await client.call("noSuchMethod")
            # the connection keeps serving after errors
            assert (await client.call("echo", 1))["params"] == 1

    run(main)


def test_stream_of_1000_chunks_with_window_16(node: LocalNode) -> None:
    async def main() -> None:
        async with await AioRpcClient.connect(node.path) as client:
            t0 = time.monotonic()
            async with client.stream("count", 1000, window=16) as s:
                items = [i async for i in s]
            assert items == list(range(1000))
            assert s.trailer == {"total": 1000}
            # with broken credit the server would stall after 16 chunks and
            # end the call after its stall timeout (2 s)
            assert time.monotonic() - t0 < 2

            # a slow reader: the server waits for credit rather than stalling
            async with client.stream("count", 40, window=4) as s:
                slow = []
                async for i in s:
                    slow.append(i)
                    await asyncio.sleep(0.005)
            assert slow == list(range(40)) and s.trailer == {"total": 40}

    run(main)


def test_next_nowait_returns_queued_chunks(node: LocalNode) -> None:
    async def main() -> None:
        async with await AioRpcClient.connect(node.path) as client:
            async with client.stream("count", 10, window=32) as s:
                with pytest.raises(WouldBlock):
                    s.next_nowait()  # the request has not even left yet
                first = await s.__anext__()
                got = [first]
                for _ in range(100):  # the rest arrive in the same read or soon after
                    try:
                        got.append(s.next_nowait())
                    except WouldBlock:
                        await asyncio.sleep(0.01)
                    except StopAsyncIteration:
                        break
                assert got == list(range(10))
                assert s.trailer == {"total": 10}
                with pytest.raises(StopAsyncIteration):
                    s.next_nowait()

    run(main)


def test_leaving_a_stream_early_cancels_the_handler(node: LocalNode) -> None:
    async def main() -> None:
        async with await AioRpcClient.connect(node.path) as client:
            async with client.stream("endless", window=8) as s:
                async for i in s:
                    if i == 20:
                        break
            assert await wait_event(node.service.endless_closed, 1.0)
            assert not client._pending
            assert (await client.call("echo", "still"))["params"] == "still"

    run(main)


def test_cancelling_the_calling_task_cancels_the_handler(node: LocalNode) -> None:
    async def main() -> None:
        async with await AioRpcClient.connect(node.path) as client:
            task = asyncio.create_task(client.call("slow"))
            assert await wait_event(node.service.slow_started, 2.0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await wait_event(node.service.slow_cancelled, 1.0)
            assert not client._pending

    run(main)


def test_timeout_bounds_the_handler_on_the_node(node: LocalNode) -> None:
    async def main() -> None:
        async with await AioRpcClient.connect(node.path) as client:
            t0 = time.monotonic()
            with pytest.raises(errors.DeadlineExceeded):
                await client.call("slow", timeout=0.3)
            assert 0.25 < time.monotonic() - t0 < 1.0  # the server's answer, not our grace
            remaining = node.service.slow_remaining[-1]
            assert remaining is not None and 0.1 < remaining <= 0.3
            assert await wait_event(node.service.slow_cancelled, 1.0)

    run(main)


def test_anyio_deadline_becomes_the_call_timeout(node: LocalNode) -> None:
    """Starlette runs handlers in anyio cancel scopes: their deadline is sent."""

    async def main() -> None:
        async with await AioRpcClient.connect(node.path) as client:
            with anyio.move_on_after(0.5):
                # The scope's cancellation and the node's DeadlineExceeded
                # (due at the same instant) race; either ends the call.
                with contextlib.suppress(errors.DeadlineExceeded):
                    await client.call("slow")
            remaining = node.service.slow_remaining[-1]
            assert remaining is not None and 0.2 < remaining <= 0.5
            assert await wait_event(node.service.slow_cancelled, 1.0)
            # outside any scope no timeout is sent
            node.service.slow_started.clear()
            task = asyncio.create_task(client.call("slow"))
            assert await wait_event(node.service.slow_started, 2.0)
            assert node.service.slow_remaining[-1] is None
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main)


def test_500_concurrent_calls_on_one_connection(node: LocalNode) -> None:
    async def main() -> None:
        async with await AioRpcClient.connect(node.path) as client:
            results = await asyncio.gather(*(client.call("echo", i) for i in range(500)))
            assert [r["params"] for r in results] == list(range(500))
            assert not client._pending
            assert node.server.stats.streams_open == 1

    run(main)


def test_server_going_away_fails_pending_calls(node: LocalNode) -> None:
    async def main() -> None:
        client = await AioRpcClient.connect(node.path)
        calls = [asyncio.create_task(client.call("slow")) for _ in range(3)]
        watcher = asyncio.create_task(client.wait_closed())
        stream = client.stream("endless", window=4)
        await stream.__aenter__()
        assert await wait_event(node.service.slow_started, 2.0)
        await asyncio.to_thread(node.stop)
        for task in calls:
            with pytest.raises(errors.StreamBroken) as info:
                await task
            assert str(node.path) in info.value.message
        with pytest.raises(errors.StreamBroken):
            async for _ in stream:
                pass
        await stream.__aexit__(None, None, None)
        assert client.closed
        await asyncio.wait_for(watcher, 1)
        with pytest.raises(errors.PeerUnavailable):
            await client.call("echo")
        await client.aclose()

    run(main)
    assert not node.path.exists()  # the server removed its socket file

    async def reconnect() -> None:
        with pytest.raises(errors.PeerUnavailable):
            await AioRpcClient.connect(node.path)

    run(reconnect)


def test_socket_is_private_and_parent_must_be_too(node: LocalNode, tmp_path: Path) -> None:
    assert stat.S_ISSOCK(os.lstat(node.path).st_mode)
    assert stat.S_IMODE(os.lstat(node.path).st_mode) == 0o600

    async def serve_at(path: Path) -> None:
        server = RpcServer(is_member=lambda p: True)
        with trio.move_on_after(0.2):  # (the refusals come before it listens)
            await serve_local(server, path, NODE_ID)
        raise AssertionError("serve_local did not refuse")

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o770)
    with pytest.raises(errors.ConfigError, match="writable by other users"):
        trio.run(serve_at, shared / "node.sock")
    assert not (shared / "node.sock").exists()

    # a second server on a live socket is refused; a file that is not a socket is kept
    with pytest.raises(errors.ConfigError, match="already serving"):
        trio.run(serve_at, node.path)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "node.sock").write_text("not a socket")
    with pytest.raises(errors.ConfigError, match="not a socket"):
        trio.run(serve_at, private / "node.sock")
    assert (private / "node.sock").read_text() == "not a socket"


def test_stale_socket_file_is_replaced(sock_dir: Path) -> None:
    import socket

    path = sock_dir / "node.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a node that died: the file stays, nobody listens
    n = LocalNode(path).start()
    try:
        async def main() -> None:
            async with await AioRpcClient.connect(path) as client:
                assert (await client.call("echo", 5))["params"] == 5

        run(main)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    finally:
        n.stop()


def test_request_id_reaches_the_handler(node: LocalNode) -> None:
    async def main() -> None:
        async with await AioRpcClient.connect(node.path) as client:
            token = current_request_id.set("req-abc.123")
            try:
                out = await client.call("echo")
            finally:
                current_request_id.reset(token)
            assert out["rid"] == "req-abc.123" and out["rid_var"] == "req-abc.123"
            # an explicit rid in meta wins; without any the server makes one up
            out = await client.call("echo", meta={"rid": "given"})
            assert out["rid"] == "given"
            out = await client.call("echo")
            assert out["rid"] and out["rid"] != "req-abc.123"

    run(main)


def test_undecodable_answer_fails_only_its_call(node: LocalNode) -> None:
    async def main() -> None:
        client = await AioRpcClient.connect(node.path, max_frame=64 * 1024)
        async with client:
            with pytest.raises(errors.FrameTooLarge):
                await client.call("big", 100_000)  # the answer exceeds our frame limit
            with pytest.raises(errors.FrameTooLarge):
                await client.call("echo", b"y" * 100_000)  # refused before sending
            assert not client._pending
            assert (await client.call("echo", 3))["params"] == 3

    run(main)


def test_uncoalesced_writes_and_uvloop(node: LocalNode) -> None:
    async def main() -> None:
        for coalesce in (True, False):
            async with await AioRpcClient.connect(node.path, coalesce=coalesce) as client:
                results = await asyncio.gather(*(client.call("echo", i) for i in range(50)))
                assert [r["params"] for r in results] == list(range(50))
                async with client.stream("count", 100, window=8) as s:
                    assert [i async for i in s] == list(range(100))

    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 20))
    run(main)


@pytest.fixture
def deaf_socket(sock_dir: Path) -> Iterator[Path]:
    """A unix socket that accepts connections (the kernel's backlog) and
    never reads or answers: a wedged node."""
    import socket

    path = sock_dir / "deaf.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    yield path
    listener.close()


def test_a_node_that_stops_reading_holds_new_calls_back(
        deaf_socket: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from p2pinfer.rpc import aio

    monkeypatch.setattr(aio, "LOCAL_GRACE", 0.1)

    async def main() -> None:
        client = await AioRpcClient.connect(deaf_socket)
        # no answer within the timeout and the grace: the client gives up itself
        t0 = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded):
            await client.call("echo", timeout=0.1)
        assert 0.15 < time.monotonic() - t0 < 1.0
        # fill the socket buffers until the transport pauses writing
        big = b"z" * 200_000
        stuck = []
        for _ in range(200):
            stuck.append(asyncio.create_task(client.call("echo", big)))
            await asyncio.sleep(0)
            if client._paused:
                break
        assert client._paused
        waiting = asyncio.create_task(client.call("echo", 1))
        await asyncio.sleep(0.1)
        assert not waiting.done()  # held back, not queued without bound
        t0 = time.monotonic()
        await client.aclose()  # cannot flush: gives up after CLOSE_TIMEOUT
        assert time.monotonic() - t0 < aio.CLOSE_TIMEOUT + 1
        with pytest.raises(errors.PeerUnavailable):
            await waiting
        for task in stuck:
            with pytest.raises(errors.StreamBroken, match="closed"):
                await task

    run(main)
