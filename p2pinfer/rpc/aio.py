"""An asyncio RPC client for the node's local unix socket.

HTTP workers run uvicorn on asyncio (or uvloop) in their own processes and
call their node, a trio process, over the socket that
:func:`p2pinfer.rpc.local_socket.serve_local` listens on. This is the client
side: the same wire protocol and the same behaviour as the trio
:class:`~p2pinfer.rpc.client.RpcClient` (one connection multiplexing every
call by id, the caller's remaining time sent as the call's timeout, CANCEL
when a caller gives up, credit-based flow control on streams, remote errors
rebuilt with their class and code), on asyncio, without importing trio.

    async with await AioRpcClient.connect(home / "node.sock") as node:
        health = await node.call("getServiceHealth")
        async with node.stream("processPrompt", {...}) as chunks:
            async for chunk in chunks:
                ...

It is an :class:`asyncio.Protocol` rather than a StreamReader/Writer pair:
bytes go straight from ``data_received`` into the frame decoder and each
frame wakes its caller's future, with no reader task and no extra copy.

Deadlines: a call's ``timeout`` defaults to the time left in the caller's
anyio cancel scope (Starlette runs request handlers in anyio scopes on
asyncio), so ``with anyio.fail_after(2):`` around a call also bounds the
handler on the node. The client gives the server that long plus
:data:`LOCAL_GRACE` to answer before failing the call itself with
:class:`~p2pinfer.errors.DeadlineExceeded`, so a wedged node cannot hold a
caller for ever either.
"""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import anyio

from .. import wire
from ..errors import (
    DeadlineExceeded,
    MalformedFrame,
    PeerUnavailable,
    StreamBroken,
    error_from_code,
)
from ..tracing import current_request_id
from .credit import ChunkBuffer, CreditRule

__all__ = ["AioRpcClient", "AioRpcStream", "WouldBlock", "DEFAULT_STREAM_WINDOW",
           "LOCAL_GRACE"]

log = logging.getLogger(__name__)

# The same default as the server's (p2pinfer.rpc.server, which imports trio).
DEFAULT_STREAM_WINDOW = 32
# The largest window the server honours; above it the server would fall back
# to its default while we waited for a bigger one, and the stream would stall.
MAX_STREAM_WINDOW = 4096
# Seconds past a call's timeout before the client gives up on its own: the
# server answers DeadlineExceeded at the timeout, and that answer is better
# (it says the handler was stopped), so it gets time to arrive.
LOCAL_GRACE = 1.0
# Seconds `aclose` waits for queued frames to leave before dropping them.
CLOSE_TIMEOUT = 1.0
# Frames queued in one event-loop iteration are written together, but at
# most this many at a time. Holding a whole burst to the end of the
# iteration (the responses to 16 calls wake 16 tasks, each sends its next
# request) makes the two processes take turns: the node idles while the
# worker runs all 16 tasks, then the worker idles while the node answers all
# 16. Groups of 8 let the node start on the first group while the worker
# still produces the rest. On 2 cores (benchmarks/bench_local_rpc.py), at 16
# calls in flight, groups of 8 gave ~20-30 % more calls/s than whole-
# iteration batches and matched one write per frame; at 64 in flight they
# matched or beat both, with ~10-15 % less worker CPU per call than one
# write per frame. (The runs were noisy: a shared 2-core machine.) With at
# most one call in flight a frame is written at once: nothing would join it.
WRITE_GROUP = 8


class WouldBlock(asyncio.QueueEmpty):
    """:meth:`AioRpcStream.next_nowait` found no chunk waiting (an
    :class:`asyncio.QueueEmpty`, so either name catches it)."""


def remaining_time() -> float | None:
    """Seconds left in the current task's anyio cancel scopes, or None.

    ``anyio.current_effective_deadline`` is ``inf`` outside any scope (a
    plain asyncio task), ``-inf`` inside one already cancelled (sent as 0:
    the caller is about to be cancelled anyway), and on the event loop's
    clock, which ``anyio.current_time`` reads.
    """
    try:
        deadline = anyio.current_effective_deadline()
        if deadline == math.inf:
            return None
        if deadline == -math.inf:
            return 0.0
        return max(0.0, deadline - anyio.current_time())
    except Exception:  # no event loop anyio recognises: no deadline to pass on
        return None


def _call_meta(meta: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(meta) if meta else {}
    rid = current_request_id.get()
    if rid is not None and "rid" not in out:
        out["rid"] = rid
    return out


class _Streaming(ChunkBuffer):
    """The chunks of one stream call, from ``data_received`` to the reader:
    a deque and at most one waiting future."""

    __slots__ = ("waiter",)

    def __init__(self, window: int) -> None:
        super().__init__(window)
        self.waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self.items:
            self.waiter = loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None


_Pending = asyncio.Future[tuple[bool, Any]] | _Streaming


class AioRpcClient(asyncio.Protocol):
    """One connection to a node's local RPC socket, shared by every call.

    Create it with :meth:`connect`. The ``connection_made``,
    ``data_received``, ``connection_lost``, ``pause_writing`` and
    ``resume_writing`` methods are asyncio's protocol callbacks, not API.

    Args:
        coalesce: queue the frames sent during one event-loop iteration and
            write them with one ``transport.write`` per :data:`WRITE_GROUP`
            frames (one system call for a burst of calls instead of one
            each); False writes every frame at once.
    """

    def __init__(self, path: str | Path, *, max_frame: int = wire.DEFAULT_MAX_FRAME,
                 coalesce: bool = True) -> None:
        self.path = str(path)
        self.max_frame = max_frame
        self._loop = asyncio.get_running_loop()
        self._decoder = wire.FrameDecoder(max_frame)
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._coalesce = coalesce
        self._outbox: list[bytes] = []
        self._flush_scheduled = False
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._lost: StreamBroken | None = None
        self._gone = self._loop.create_future()
        self._server_error: str | None = None
        self._closing = False
        self.bytes_in = 0
        self.bytes_out = 0

    # -- opening and closing ------------------------------------------------------
    @classmethod
    async def connect(cls, path: str | Path, *, max_frame: int = wire.DEFAULT_MAX_FRAME,
                      coalesce: bool = True) -> AioRpcClient:
        """Connect to the node's socket at ``path``.

        Raises:
            PeerUnavailable: nothing listens there (the node is not running)
                or we may not connect (another user's node).
        """
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_unix_connection(
                lambda: cls(path, max_frame=max_frame, coalesce=coalesce), str(path))
        except OSError as exc:
            raise PeerUnavailable(f"cannot connect to the node at {path}: {exc}",
                                  data={"path": str(path)}) from exc
        return protocol

    @property
    def closed(self) -> bool:
        """No new call can start: the connection is closing or gone."""
        return self._closing or self._lost is not None

    async def aclose(self) -> None:
        """Cancel the calls in flight (their handlers stop on the node),
        send what is queued, and close the connection."""
        transport = self._transport
        if transport is None or self._lost is not None:
            return
        self._closing = True
        for call_id in list(self._pending):
            self._send(wire.Cancel(call_id))
        self._write_outbox()
        transport.close()  # connection_lost fails what is still pending
        done, _ = await asyncio.wait({self._gone}, timeout=CLOSE_TIMEOUT)
        if not done:  # the node stopped reading: drop the unsent frames
            transport.abort()
            await asyncio.shield(self._gone)

    async def wait_closed(self) -> None:
        """Return once the connection is gone (closed here, or the node
        went away): a worker watches this to stop when its node stops."""
        await asyncio.shield(self._gone)

    async def __aenter__(self) -> AioRpcClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    # -- asyncio protocol callbacks -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses)
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        for item in self._decoder.feed(data):
            self._dispatch(item)

    def eof_received(self) -> bool | None:
        # The node half-closed: it will send nothing more, so nothing pending
        # can be answered. Returning None closes our side too.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        reason = (f"the connection to the node at {self.path} was closed" if self._closing
                  else f"the connection to the node at {self.path} was lost")
        if exc is not None:
            reason += f": {type(exc).__name__}: {exc}"
        if self._server_error is not None:
            reason += f" ({self._server_error})"
        error = StreamBroken(reason, data={"path": self.path})
        self._lost = error
        self._outbox.clear()
        pending, self._pending = self._pending, {}
        for item in pending.values():
            self._fail(item, error)
        self._wake_drain_waiters()
        if not self._gone.done():
            self._gone.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drain_waiters()

    # -- frames out ------------------------------------------------------------------
    def _send(self, msg: wire.Message) -> None:
        """Queue one frame. Raises FrameTooLarge (or MalformedFrame for a
        value msgpack cannot encode) before anything is queued; drops the
        frame silently once the connection is gone."""
        data = wire.encode(msg, max_frame=self.max_frame)
        transport = self._transport
        if transport is None or self._lost is not None or transport.is_closing():
            return
        if not self._coalesce:
            transport.write(data)
            self.bytes_out += len(data)
            return
        outbox = self._outbox
        if not outbox and len(self._pending) <= 1:
            # At most one call in flight: no burst to wait for, and holding
            # the frame to the end of the iteration would only add latency.
            transport.write(data)
            self.bytes_out += len(data)
            return
        outbox.append(data)
        if len(outbox) >= WRITE_GROUP:
            self._write_outbox()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write_outbox()

    def _write_outbox(self) -> None:
        out = self._outbox
        if not out:
            return
        self._outbox = []
        transport = self._transport
        if transport is None or self._lost is not None or transport.is_closing():
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        transport.write(data)
        self.bytes_out += len(data)

    def _cancel_call(self, call_id: int) -> None:
        """Tell the node to stop a call we gave up on (if it still runs)."""
        if self._lost is None:
            self._send(wire.Cancel(call_id))

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _ready_for_call(self) -> None:
        """Wait while the socket's send buffer is above its high-water mark
        (the node is not keeping up): new calls wait, frames that answer the
        node (credit, cancel) never do. Raises PeerUnavailable when closed."""
        while True:
            if self._closing or self._lost is not None:
                raise PeerUnavailable(f"the connection to the node at {self.path} is closed",
                                      data={"path": self.path})
            if not self._paused:
                return
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def _new_id(self) -> int:
        call_id = self._next_id
        self._next_id += 1
        return call_id

    # -- frames in -------------------------------------------------------------------
    @staticmethod
    def _fail(pending: _Pending, error: BaseException) -> None:
        if isinstance(pending, _Streaming):
            pending.fail(error)
        elif not pending.done():
            pending.set_result((False, error))

    def _dispatch(self, item: wire.Message | wire.DecodeError) -> None:
        if isinstance(item, wire.DecodeError):
            pending = self._pending.pop(item.call_id, None) if item.call_id else None
            if pending is None:
                log.warning("bad frame from the node at %s: %s", self.path, item.error.message)
                return
            self._fail(pending, item.error)
            if isinstance(pending, _Streaming):
                self._cancel_call(item.call_id)  # the stream cannot go on
            return
        pending = self._pending.get(item.id)
        if pending is None:
            if isinstance(item, wire.Error) and item.id == 0:
                # About the connection, not a call (e.g. too many streams);
                # the node closes it next, and this says why.
                self._server_error = f"{item.message} (code {item.code})"
                log.warning("node at %s: %s", self.path, self._server_error)
            return  # a late answer to a call we already gave up on
        if isinstance(pending, _Streaming):
            if isinstance(item, wire.Chunk):
                if not pending.push("chunk", item.data):
                    del self._pending[item.id]
                    pending.fail(MalformedFrame(
                        "the node sent more chunks than it had credit for"))
                    self._cancel_call(item.id)
                return
            del self._pending[item.id]
            if isinstance(item, wire.End):
                pending.done = True
                pending.push("end", item.trailer)
            elif isinstance(item, wire.Error):
                pending.fail(error_from_code(item.code, item.message, item.data))
            else:
                pending.fail(MalformedFrame(f"unexpected {type(item).__name__} for a stream"))
                self._cancel_call(item.id)
            return
        del self._pending[item.id]
        if pending.done():  # cancelled, the caller has not run yet
            return
        if isinstance(item, wire.Response):
            pending.set_result((True, item.result))
        elif isinstance(item, wire.Error):
            pending.set_result((False, error_from_code(item.code, item.message, item.data)))
        else:
            pending.set_result(
                (False, MalformedFrame(f"unexpected {type(item).__name__} for a unary call")))

    def _expire(self, call_id: int, method: str, timeout: float) -> None:
        """The node did not answer within a call's timeout and the grace:
        give up here and tell it to stop."""
        pending = self._pending.pop(call_id, None)
        if pending is None:
            return
        self._fail(pending, DeadlineExceeded(
            f"{method}: no answer from the node within {timeout:g} s",
            data={"timeout": timeout}))
        self._cancel_call(call_id)

    # -- calls -----------------------------------------------------------------------
    async def call(
        self,
        method: str,
        params: Any = None,
        *,
        # the node's time budget for the call, sent in the frame (not only a
        # local wait, which is what ruff's ASYNC109 assumes)
        timeout: float | None = None,  # noqa: ASYNC109
        meta: dict[str, Any] | None = None,
    ) -> Any:
        """Call ``method`` on the node and return its result.

        Args:
            timeout: seconds the node may spend on the call; defaults to the
                time left in the caller's anyio cancel scope, if any.
            meta: call metadata; the current request id is added as ``rid``.

        Raises:
            P2PInferError: the node's error, with its class and code;
                ``PeerUnavailable`` if the connection is closed;
                ``StreamBroken`` if it was lost during the call;
                ``DeadlineExceeded`` past the timeout.
            asyncio.CancelledError: the caller was cancelled (the node is
                told to stop the handler).
        """
        if self._paused or self.closed:
            await self._ready_for_call()
        if timeout is None:
            timeout = remaining_time()
        call_id = self._new_id()
        self._send(wire.Request(call_id, method, params, timeout, _call_meta(meta)))
        fut: asyncio.Future[tuple[bool, Any]] = self._loop.create_future()
        self._pending[call_id] = fut
        timer = (None if timeout is None else
                 self._loop.call_later(timeout + LOCAL_GRACE, self._expire, call_id, method,
                                       timeout))
        try:
            ok, value = await fut
        except asyncio.CancelledError:
            if self._pending.pop(call_id, None) is not None:
                self._cancel_call(call_id)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if ok:
            return value
        raise value

    def stream(
        self,
        method: str,
        params: Any = None,
        *,
        timeout: float | None = None,
        meta: dict[str, Any] | None = None,
        window: int = DEFAULT_STREAM_WINDOW,
    ) -> AioRpcStream:
        """A server-streaming call: ``async with client.stream(...) as s``,
        then ``async for chunk in s``; ``s.trailer`` once it is exhausted.

        ``window`` is how many chunks the node may send ahead of the reader
        (1 to 4096).
        """
        if not 0 < window <= MAX_STREAM_WINDOW:
            raise ValueError(f"window must be between 1 and {MAX_STREAM_WINDOW}")
        return AioRpcStream(self, method, params, timeout, meta, window)


class AioRpcStream:
    """A server-streaming call on an :class:`AioRpcClient`.

    The request goes out on ``async with``; leaving the block before the
    stream's end sends CANCEL, which stops the handler on the node. Credit
    goes out as the trio client sends it: per half window, or at once when
    the node has used all it had.
    """

    def __init__(self, client: AioRpcClient, method: str, params: Any,
                 timeout: float | None, meta: dict[str, Any] | None, window: int) -> None:
        self._client = client
        self._method = method
        self._params = params
        self._timeout = timeout
        self._meta = meta
        self._window = window
        self._call_id = 0
        self._state: _Streaming | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._credit = CreditRule(window)
        self._finished = False
        self.trailer: Any = None

    async def __aenter__(self) -> AioRpcStream:
        client = self._client
        if client._paused or client.closed:
            await client._ready_for_call()
        timeout = self._timeout if self._timeout is not None else remaining_time()
        meta = _call_meta(self._meta)
        meta["credit"] = self._window
        call_id = client._new_id()
        client._send(wire.Request(call_id, self._method, self._params, timeout, meta))
        self._call_id = call_id
        self._state = _Streaming(self._window)
        client._pending[call_id] = self._state
        if timeout is not None:
            self._timer = client._loop.call_later(
                timeout + LOCAL_GRACE, client._expire, call_id, self._method, timeout)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self._finished:
            self._finished = True
            if self._client._pending.pop(self._call_id, None) is not None:
                self._client._cancel_call(self._call_id)

    def __aiter__(self) -> AioRpcStream:
        return self

    async def __anext__(self) -> Any:
        if self._finished:
            raise StopAsyncIteration
        state = self._state
        assert state is not None, "use the stream in `async with`"
        if not state.items:
            await state.wait(self._client._loop)
        return self._take(state.items.popleft())

    def next_nowait(self) -> Any:
        """The next chunk if one has already arrived (lets a relay merge the
        chunks that are queued without waiting for more).

        Raises:
            WouldBlock: nothing is queued yet.
            StopAsyncIteration: the stream has ended.
        """
        if self._finished:
            raise StopAsyncIteration
        state = self._state
        assert state is not None, "use the stream in `async with`"
        if not state.items:
            raise WouldBlock
        return self._take(state.items.popleft())

    def _take(self, item: tuple[str, Any]) -> Any:
        kind, value = item
        if kind == "chunk":
            assert self._state is not None
            credit = self._credit.took_chunk(len(self._state.items))
            if credit and self._client._lost is None:
                self._client._send(wire.Credit(self._call_id, credit))
            return value
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
        if kind == "end":
            self.trailer = value
            raise StopAsyncIteration
        raise value
