"""The RPC client: unary and server-streaming calls to peers.

One long-lived RPC stream per peer carries every call to that peer,
multiplexed by call id; it is opened on first use and reopened after it
breaks. Each call sends the caller's remaining trio deadline, so a
``with trio.fail_after(2):`` around a call also bounds the work on the
server. Cancelling a call (or leaving an :class:`RpcStream` early) sends a
CANCEL frame that stops the handler on the server.

    async with RpcClient.open(host) as client:
        peer = await client.connect("/ip4/127.0.0.1/tcp/4001/p2p/12D3KooW...")
        health = await client.call(peer, "getServiceHealth")
        async with client.stream(peer, "processPrompt", {...}) as chunks:
            async for chunk in chunks:
                ...
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from .. import wire
from ..errors import (
    MalformedFrame,
    PeerUnavailable,
    StreamBroken,
    error_from_code,
)
from ..tracing import current_request_id
from .channel import FramedChannel, libp2p_errors
from .credit import ChunkBuffer, CreditRule
from .host import RPC_PROTOCOL, peer_info
from .local import memory_stream_pair
from .server import DEFAULT_STREAM_WINDOW

__all__ = ["RpcClient", "RpcStream"]

log = logging.getLogger(__name__)

# Seconds to open an RPC stream over an existing connection before treating
# the connection as stale, and to dial a new one.
STALE_STREAM_TIMEOUT = 2.0
OPEN_TIMEOUT = 10.0


@functools.lru_cache(maxsize=4096)
def _peer_id_obj(peer_id: str) -> Any:
    from libp2p.peer.id import ID

    from ..errors import InvalidParams

    try:
        return ID.from_base58(peer_id)
    except Exception as exc:
        raise InvalidParams(f"not a peer id: {peer_id[:64]!r}") from exc


def _refused_protocol(exc: BaseException) -> bool:
    """The peer is alive but does not serve RPC (e.g. an SDK client): its
    connection is fine and must not be torn down.

    py-libp2p 0.8.1 raises ``StreamFailure("failed to open a stream ...")``
    *from* the negotiation error that says so: look down the whole chain.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        text = str(cause)
        if "protocol not supported" in text or "protocols not supported" in text:
            return True
        cause = cause.__cause__ or cause.__context__
    return False


class _Unary:
    __slots__ = ("event", "result", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def resolve(self, result: Any) -> None:
        self.result = result
        self.event.set()

    def fail(self, error: BaseException) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()


class _Streaming(ChunkBuffer):
    """The chunks of one stream call, from the channel's reader to the caller.

    A deque and at most one waiting task (the caller): creating a trio
    memory channel per call was 3-7 % of a busy gateway's or client's time.
    """

    __slots__ = ("waiter",)

    def __init__(self, window: int) -> None:
        super().__init__(window)
        self.waiter: Any = None

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            trio.lowlevel.reschedule(waiter)

    def receive_nowait(self) -> tuple[str, Any]:
        if not self.items:
            raise trio.WouldBlock
        return self.items.popleft()

    async def receive(self) -> tuple[str, Any]:
        if self.items:
            await trio.lowlevel.checkpoint()
        while not self.items:  # (a checkpoint may let the last item be taken)
            self.waiter = trio.lowlevel.current_task()

            def abort(_: Any) -> trio.lowlevel.Abort:
                self.waiter = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        return self.items.popleft()


class _PeerChannel:
    """All calls to one peer, over one RPC stream."""

    def __init__(self, channel: FramedChannel, peer_id: str) -> None:
        self.channel = channel
        self.peer_id = peer_id
        self.pending: dict[int, _Unary | _Streaming] = {}
        self._next_id = 1
        self.closed = False
        self.retiring = False

    def new_id(self) -> int:
        call_id = self._next_id
        self._next_id += 1
        return call_id

    async def run(self) -> None:
        error: BaseException = StreamBroken(f"RPC stream to {self.peer_id} closed")
        try:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.channel.run_writer)
                    async for item in self.channel.messages():
                        self._dispatch(item)
                    nursery.cancel_scope.cancel()
            except* StreamBroken as group:  # the usual end: the peer went away
                error = group.exceptions[0]
        except Exception as exc:  # never let one broken peer take the client down
            log.exception("RPC channel to %s failed", self.peer_id)
            error = StreamBroken(f"RPC stream to {self.peer_id} failed: {exc}")
        finally:
            self.closed = True
            for pending in list(self.pending.values()):
                pending.fail(error)
            self.pending.clear()
            await self.channel.aclose(reset=True)

    def _dispatch(self, item: wire.Message | wire.DecodeError) -> None:
        if isinstance(item, wire.DecodeError):
            log.warning("bad frame from %s: %s", self.peer_id, item.error.message)
            pending = self.pending.get(item.call_id) if item.call_id else None
            if pending is not None:
                pending.fail(item.error)
            return
        pending = self.pending.get(item.id)
        if pending is None:
            if isinstance(item, wire.Error) and item.id == 0:
                log.warning("peer %s: %s (code %d)", self.peer_id, item.message, item.code)
            return  # a late answer to a call we already gave up on
        if isinstance(item, wire.Error):
            pending.fail(error_from_code(item.code, item.message, item.data))
        elif isinstance(pending, _Unary):
            if isinstance(item, wire.Response):
                pending.resolve(item.result)
            else:
                pending.fail(MalformedFrame(f"unexpected {type(item).__name__} for a unary call"))
        elif isinstance(item, wire.Chunk):
            if not pending.push("chunk", item.data):
                pending.fail(MalformedFrame("the server sent more chunks than it had credit for"))
        elif isinstance(item, wire.End):
            pending.done = True
            pending.push("end", item.trailer)
        else:
            pending.fail(MalformedFrame(f"unexpected {type(item).__name__} for a stream call"))

    def send_request(self, call_id: int, method: str, params: Any, meta: dict[str, Any]) -> None:
        if self.closed:
            raise StreamBroken(f"RPC stream to {self.peer_id} is closed")
        deadline = trio.current_effective_deadline()
        timeout = None if deadline == math.inf else max(0.0, deadline - trio.current_time())
        self.channel.send_nowait(wire.Request(call_id, method, params, timeout, meta))

    def cancel(self, call_id: int) -> None:
        if not self.closed:
            self.channel.send_nowait(wire.Cancel(call_id))
        self.done(call_id)

    def done(self, call_id: int) -> None:
        """Forget a finished call; a retiring channel closes after its last."""
        self.pending.pop(call_id, None)
        if self.retiring and not self.pending:
            self.channel.finish()

    def retire(self) -> None:
        """Take no new call; close once the calls in flight have finished
        (unlike closing at once, their credit and cancels still go out)."""
        self.retiring = True
        if not self.pending:
            self.channel.finish()


class RpcStream:
    """A server-streaming call: iterate over its chunks; ``trailer`` holds the
    END frame's value once the stream is exhausted."""

    def __init__(
        self,
        client: RpcClient,
        peer_id: str,
        method: str,
        params: Any,
        meta: dict[str, Any] | None,
        window: int,
    ) -> None:
        self._client = client
        self._peer_id = peer_id
        self._method = method
        self._params = params
        self._meta = meta
        self._window = window
        self._channel: _PeerChannel | None = None
        self._call_id = 0
        self._pending: _Streaming | None = None
        self._credit = CreditRule(window)
        self._finished = False
        self.trailer: Any = None

    async def __aenter__(self) -> RpcStream:
        channel = await self._client._channel_for(self._peer_id)
        self._channel = channel
        self._call_id = channel.new_id()
        self._pending = _Streaming(self._window)
        channel.pending[self._call_id] = self._pending
        meta = self._client._call_meta(self._meta)
        meta["credit"] = self._window
        channel.send_request(self._call_id, self._method, self._params, meta)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._channel is not None
        if not self._finished:
            self._channel.cancel(self._call_id)
        else:
            self._channel.done(self._call_id)

    def __aiter__(self) -> RpcStream:
        return self

    async def __anext__(self) -> Any:
        if self._finished:
            raise StopAsyncIteration
        assert self._pending is not None and self._channel is not None
        return self._take(await self._pending.receive())

    def next_nowait(self) -> Any:
        """The next chunk if one has already arrived, else ``trio.WouldBlock``
        (lets a relay merge chunks that are queued, without waiting for more).

        Raises:
            trio.WouldBlock: nothing is queued. StopAsyncIteration: the stream ended.
        """
        if self._finished:
            raise StopAsyncIteration
        assert self._pending is not None
        return self._take(self._pending.receive_nowait())

    def _take(self, item: tuple[str, Any]) -> Any:
        assert self._pending is not None and self._channel is not None
        kind, value = item
        if kind == "chunk":
            credit = self._credit.took_chunk(len(self._pending.items))
            if credit and not self._channel.closed:
                self._channel.channel.send_nowait(wire.Credit(self._call_id, credit))
            return value
        self._finished = True
        self._channel.done(self._call_id)
        if kind == "end":
            self.trailer = value
            raise StopAsyncIteration
        raise value


class RpcClient:
    """Calls RPC methods on peers. Needs :meth:`run` (or :meth:`open`)."""

    def __init__(
        self,
        host: Any,
        *,
        max_frame: int = wire.DEFAULT_MAX_FRAME,
        stream_window: int = DEFAULT_STREAM_WINDOW,
    ) -> None:
        self.host = host
        self.max_frame = max_frame
        self.stream_window = stream_window
        self._channels: dict[str, _PeerChannel] = {}
        self._opening: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self._errors = libp2p_errors()
        self.local_peer_id: str | None = None
        self.local_server: Any = None

    def serve_locally(self, peer_id: str, server: Any) -> None:
        """Route calls addressed to ``peer_id`` (this node) to ``server`` in-process."""
        self.local_peer_id = peer_id
        self.local_server = server

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    @classmethod
    @asynccontextmanager
    async def open(cls, host: Any, **kwargs: Any) -> AsyncIterator[RpcClient]:
        client = cls(host, **kwargs)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()

    # -- connections -------------------------------------------------------------
    async def connect(self, addr: str) -> str:
        """Dial ``/…/p2p/<peer id>``; returns the peer id. Idempotent."""
        info = peer_info(addr)
        try:
            await self.host.connect(info)
        except self._errors as exc:
            raise PeerUnavailable(f"cannot reach {addr}: {exc}") from exc
        except Exception as exc:  # py-libp2p raises bare Exceptions on dial failures
            raise PeerUnavailable(f"cannot reach {addr}: {type(exc).__name__}: {exc}") from exc
        return str(info.peer_id.to_base58())

    async def _channel_for(self, peer_id: str) -> _PeerChannel:
        channel = self._channels.get(peer_id)
        if channel is not None and not channel.closed:
            return channel
        lock = self._opening.setdefault(peer_id, trio.Lock())
        async with lock:
            channel = self._channels.get(peer_id)
            if channel is not None and not channel.closed:
                return channel
            if self._nursery is None:
                raise RuntimeError("RpcClient is not running (use RpcClient.open or run())")
            if peer_id == self.local_peer_id and self.local_server is not None:
                stream, server_end = memory_stream_pair()
                self._nursery.start_soon(self.local_server.serve_stream, server_end, peer_id)
            else:
                stream = await self._open_stream(peer_id)
            channel = _PeerChannel(FramedChannel(stream, max_frame=self.max_frame), peer_id)
            self._channels[peer_id] = channel
            self._nursery.start_soon(channel.run)
            return channel

    async def _open_stream(self, peer_id: str) -> Any:
        pid = _peer_id_obj(peer_id)
        network = self.host.get_network()
        for attempt in (1, 2):
            existing = bool(network.get_connections(pid))
            try:
                # Over a live connection a stream opens in milliseconds; one
                # that takes seconds rides a connection the peer abandoned
                # (py-libp2p would wait out its own 10 s negotiation timeout).
                limit = STALE_STREAM_TIMEOUT if existing else OPEN_TIMEOUT
                with trio.fail_after(limit):
                    return await self.host.new_stream(pid, [RPC_PROTOCOL])
            except (Exception, trio.TooSlowError) as exc:
                # py-libp2p 0.8.1 also keeps connections the peer has closed in
                # its table ("No valid connections available"), so a peer that
                # restarted could never be reached again: drop them and redial.
                if attempt == 1 and existing and not _refused_protocol(exc):
                    log.debug("stale connection to %s (%r); redialing", peer_id, exc)
                    with trio.move_on_after(1):
                        try:
                            await network.close_peer(pid)
                        except Exception:
                            log.debug("closing stale connection failed", exc_info=True)
                    continue
                raise PeerUnavailable(
                    f"cannot open an RPC stream to {peer_id}: {type(exc).__name__}: {exc}"
                ) from exc
        raise AssertionError("unreachable")

    def drop(self, peer_id: str) -> None:
        """Forget the stream to ``peer_id`` (it will be reopened on next use)."""
        channel = self._channels.pop(peer_id, None)
        if channel is not None:
            channel.channel.close_writer()

    def retire(self, peer_id: str) -> None:
        """Open the next call to ``peer_id`` on a new stream (on the
        connection the host now prefers) while the calls in flight finish
        on the old one."""
        channel = self._channels.pop(peer_id, None)
        if channel is not None:
            channel.retire()

    @staticmethod
    def _call_meta(meta: dict[str, Any] | None) -> dict[str, Any]:
        out = dict(meta) if meta else {}
        rid = current_request_id.get()
        if rid is not None and "rid" not in out:
            out["rid"] = rid
        return out

    # -- calls ---------------------------------------------------------------------
    async def call(
        self, peer_id: str, method: str, params: Any = None, *, meta: dict[str, Any] | None = None
    ) -> Any:
        """Call ``method`` on ``peer_id`` and return its result.

        Raises:
            P2PInferError: the remote error, with its code; ``PeerUnavailable``
                if the peer cannot be reached; ``StreamBroken`` if the
                connection died during the call.
        """
        channel = await self._channel_for(peer_id)
        call_id = channel.new_id()
        pending = _Unary()
        channel.pending[call_id] = pending
        try:
            channel.send_request(call_id, method, params, self._call_meta(meta))
            await pending.event.wait()
        except BaseException:
            if not pending.event.is_set():
                channel.cancel(call_id)
            raise
        finally:
            channel.done(call_id)
        if pending.error is not None:
            raise pending.error
        return pending.result

    def stream(
        self,
        peer_id: str,
        method: str,
        params: Any = None,
        *,
        meta: dict[str, Any] | None = None,
        window: int | None = None,
    ) -> RpcStream:
        """A server-streaming call, used as ``async with client.stream(...) as s``."""
        return RpcStream(self, peer_id, method, params, meta, window or self.stream_window)


