"""The RPC server: dispatch requests on a libp2p stream to ``rpc_*`` handlers.

Roles register objects whose ``rpc_<snake_name>`` methods become RPC methods
named in camelCase (``rpc_process_prompt`` serves ``processPrompt``), unless
:func:`rpc_method` names them explicitly. A handler is either::

    async def rpc_get_thing(self, ctx: CallContext, params: Any) -> Any: ...

for a unary call, or an async generator for a server stream::

    async def rpc_stream_things(self, ctx: CallContext, params: Any):
        yield item  # each item is one CHUNK frame; ctx.trailer goes in END

Every method has an :class:`Access` level. The default is ``MEMBER``: only
peers admitted to the network may call it. ``PUBLIC`` methods can be called by
any peer that completed the Noise handshake and must authenticate the caller
themselves (an API key or a session token in the params). A member-only
method may also name the **grants** it needs (``grants=("gateway",)``): the
caller's certificate must hold one of them, else ``PermissionDenied``.
Membership alone is not authority: a worker's key must not administer users
or spend another user's quota. :attr:`CallContext.grants` tells a handler
what the caller holds, for checks that depend on the params.

Guarantees:

- a handler that raises produces an ERROR frame with the error's code
  (``HandlerError`` for anything that is not a :class:`P2PInferError`) and
  the stream keeps serving;
- the caller's remaining time becomes the handler's deadline;
- a CANCEL frame, a deadline, or the stream dying cancels the handler: a
  streaming handler stops at its next ``await`` and its ``finally`` runs;
- a streaming handler never runs more than its credit ahead of the client,
  and a client that grants no credit for ``stall_timeout`` seconds (it
  stopped reading) has the call cancelled with ``StreamStalled``: a reader
  that stops must not hold a worker's slot;
- when a peer's connection closes (:meth:`RpcServer.peer_gone`), every call
  it had in flight is cancelled at once.
"""

from __future__ import annotations

import enum
import functools
import inspect
import ipaddress
import logging
import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import wire
from ..errors import (
    Cancelled,
    DeadlineExceeded,
    FrameTooLarge,
    HandlerError,
    LimitError,
    MalformedFrame,
    NotMember,
    P2PInferError,
    PermissionDenied,
    StreamBroken,
    StreamStalled,
    TooManyStreams,
    UnknownMethod,
)
from ..grants import ALL_GRANTS
from ..tracing import current_request_id, new_request_id, valid_request_id
from .channel import FramedChannel

__all__ = ["Access", "CallContext", "RpcServer", "rpc_method", "throttle_address",
           "DEFAULT_STREAM_WINDOW"]

log = logging.getLogger(__name__)

DEFAULT_STREAM_WINDOW = 32


@functools.lru_cache(maxsize=4096)
def throttle_address(address: str) -> str:
    """``address`` as throttles count it: an IPv4 address itself, an IPv6
    address as its /64 network (a host often has a whole /64 to pick from)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Access(enum.Enum):
    PUBLIC = "public"
    MEMBER = "member"


def rpc_method(
    name: str | None = None, *, access: Access = Access.MEMBER,
    grants: tuple[str, ...] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Set the wire name, access level and needed grants (any one of them)
    of an ``rpc_*`` handler."""
    if grants and access is not Access.MEMBER:
        raise ValueError("only member-only methods can need grants")

    def deco(func: Callable[..., Any]) -> Callable[..., Any]:
        func.__rpc_name__ = name  # type: ignore[attr-defined]
        func.__rpc_access__ = access  # type: ignore[attr-defined]
        func.__rpc_grants__ = frozenset(grants)  # type: ignore[attr-defined]
        return func

    return deco


def camel_case(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


@dataclass
class CallContext:
    """What a handler knows about the call it serves."""

    peer_id: str
    method: str
    call_id: int
    is_member: bool
    request_id: str
    meta: dict[str, Any] = field(default_factory=dict)
    #: what the caller's certificate grants (empty for a non-member)
    grants: frozenset[str] = frozenset()
    deadline: float = float("inf")
    trailer: Any = None
    remote_ip: str | None = None
    _scope: trio.CancelScope | None = field(default=None, repr=False)

    @property
    def source(self) -> str:
        """Where the call came from, for throttling: ``ip:<address>`` when
        the connection's address is known (a peer id costs nothing to
        change; an address does; an IPv6 address counts as its /64, which
        one host usually holds whole), else ``peer:<peer id>``."""
        if self.remote_ip:
            return f"ip:{throttle_address(self.remote_ip)}"
        return f"peer:{self.peer_id}"

    def shorten_deadline(self, seconds: float) -> None:
        """Let the call run at most ``seconds`` more (never extends the
        caller's deadline). Past it the caller gets ``DeadlineExceeded``.

        Streaming handlers must use this rather than a cancel scope of their
        own around ``yield``, which trio does not support.
        """
        deadline = trio.current_time() + seconds
        if deadline < self.deadline:
            self.deadline = deadline
            if self._scope is not None:
                self._scope.deadline = deadline

    def remaining(self) -> float | None:
        """Seconds left before the caller's deadline, or None if it has none."""
        if self.deadline == float("inf"):
            return None
        return max(0.0, self.deadline - trio.current_time())


Handler = Callable[[CallContext, Any], Awaitable[Any] | AsyncGenerator[Any, None]]


@dataclass
class Method:
    name: str
    func: Handler
    access: Access
    streaming: bool
    grants: frozenset[str] = frozenset()


def status_of(exc: P2PInferError) -> str:
    """The metrics status of a call that raised ``exc``: limits and the
    caller's own mistakes are not server errors (they must not page anyone)."""
    if isinstance(exc, LimitError):
        return "rate_limited"
    if exc.http_status < 500:
        return "client_error"
    return "error"


class _ServerCall:
    __slots__ = ("cancel_scope", "credit", "_credit_event", "client_cancelled")

    def __init__(self, credit: int) -> None:
        self.cancel_scope = trio.CancelScope()
        self.credit = credit
        self._credit_event = trio.Event()
        self.client_cancelled = False

    def add_credit(self, n: int) -> None:
        self.credit += n
        self._credit_event.set()

    async def take_credit(self, stall_timeout: float) -> None:
        while self.credit <= 0:
            self._credit_event = trio.Event()
            with trio.move_on_after(stall_timeout):
                await self._credit_event.wait()
            if self.credit <= 0 and not self._credit_event.is_set():
                raise StreamStalled(
                    f"the caller read nothing for {stall_timeout:g} s; the stream is ended",
                    data={"stall_timeout": stall_timeout})
        self.credit -= 1


_METHOD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.]{0,127}$")


@dataclass
class ServerStats:
    calls: int = 0
    errors: int = 0
    decode_errors: int = 0
    streams_open: int = 0
    rejected_streams: int = 0
    denied: int = 0  # member calls refused for want of a grant


def _remote_ip(stream: Any) -> str | None:
    try:
        address = stream.get_remote_address()
    except Exception:  # not every stream knows (in-memory ones)
        return None
    return str(address[0]) if address else None


class RpcServer:
    """Serves registered methods on every stream of the RPC protocol.

    Args:
        is_member: tells whether a peer id belongs to an admitted network
            member; consulted for every ``MEMBER`` method call.
        grants_of: what a member's certificate grants (consulted for every
            call). Without it every member holds every grant: for a server
            that has no membership view (a benchmark, a test of the wire).
        max_frame: largest frame accepted or sent, in bytes.
        max_inflight: concurrent calls allowed on one stream.
        max_streams_per_peer: RPC streams one peer may hold open at once.
        stall_timeout: seconds a streaming call may wait for the caller's
            credit before it is ended.
    """

    def __init__(
        self,
        *,
        is_member: Callable[[str], bool],
        grants_of: Callable[[str], frozenset[str]] | None = None,
        max_frame: int = wire.DEFAULT_MAX_FRAME,
        max_inflight: int = 2048,
        max_streams_per_peer: int = 16,
        stall_timeout: float = 3.0,
    ) -> None:
        self.stall_timeout = stall_timeout
        # the calls of each peer's open streams, cancelled when it goes away
        self._peer_calls: dict[str, list[dict[int, _ServerCall]]] = {}
        self._is_member = is_member
        self._grants_of = grants_of
        self.max_frame = max_frame
        self.max_inflight = max_inflight
        self.max_streams_per_peer = max_streams_per_peer
        self.methods: dict[str, Method] = {}
        self._streams_by_peer: dict[str, int] = {}
        self.stats = ServerStats()
        self.observers: list[Callable[[str, str, float], None]] = []
        # Called with "not_member" or "no_grant" for each call refused so.
        self.on_refused: Callable[[str], None] | None = None

    # -- registration ----------------------------------------------------------
    def register(self, obj: object) -> list[str]:
        """Register every ``rpc_*`` method of ``obj``; returns the wire names."""
        names = []
        for attr in dir(type(obj)):
            if not attr.startswith("rpc_"):
                continue
            func = getattr(obj, attr)
            name = getattr(func, "__rpc_name__", None) or camel_case(attr[4:])
            access = getattr(func, "__rpc_access__", Access.MEMBER)
            grants: frozenset[str] = getattr(func, "__rpc_grants__", frozenset())
            self.add_method(name, func, access=access, grants=grants)
            names.append(name)
        return names

    def add_method(self, name: str, func: Handler, *, access: Access = Access.MEMBER,
                   grants: frozenset[str] = frozenset()) -> None:
        if not _METHOD_NAME.match(name):
            raise ValueError(f"invalid RPC method name {name!r}")
        if name in self.methods:
            raise ValueError(f"RPC method {name!r} is already registered")
        streaming = inspect.isasyncgenfunction(func)
        if not streaming and not inspect.iscoroutinefunction(func):
            raise TypeError(f"RPC handler for {name!r} must be async")
        self.methods[name] = Method(name, func, access, streaming, frozenset(grants))

    def _refused(self, reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(reason)

    def grants_for(self, peer_id: str, is_member: bool) -> frozenset[str]:
        if not is_member:
            return frozenset()
        if self._grants_of is None:
            return ALL_GRANTS
        return self._grants_of(peer_id)

    # -- serving ---------------------------------------------------------------
    async def handle_stream(self, stream: Any) -> None:
        """The libp2p stream handler (wrap with ``guard_handler``)."""
        await self.serve_stream(stream, stream.muxed_conn.peer_id.to_base58(),
                                remote_ip=_remote_ip(stream))

    async def serve_stream(self, stream: Any, peer_id: str, *,
                           remote_ip: str | None = None, limited: bool = True) -> None:
        """Serve calls arriving on ``stream`` from ``peer_id`` until it closes.

        ``limited``: the stream counts against ``max_streams_per_peer``
        (False for the node's own helper processes on its local socket,
        one stream each, however many the node runs)."""
        open_now = self._streams_by_peer.get(peer_id, 0)
        if limited and open_now >= self.max_streams_per_peer:
            self.stats.rejected_streams += 1
            log.warning("peer %s exceeded %d RPC streams; refusing", peer_id,
                        self.max_streams_per_peer)
            channel = FramedChannel(stream, max_frame=self.max_frame)
            channel.send_error_nowait(
                0, TooManyStreams(f"at most {self.max_streams_per_peer} RPC streams per peer")
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._flush_and_close, channel)
            return
        self._streams_by_peer[peer_id] = open_now + 1
        self.stats.streams_open += 1
        try:
            await self._serve(stream, peer_id, remote_ip)
        except* StreamBroken as group:  # the peer went away: an ordinary end
            log.debug("RPC stream from %s broke: %s", peer_id, group.exceptions[0])
        finally:
            self.stats.streams_open -= 1
            left = self._streams_by_peer[peer_id] - 1
            if left:
                self._streams_by_peer[peer_id] = left
            else:
                del self._streams_by_peer[peer_id]

    async def _flush_and_close(self, channel: FramedChannel) -> None:
        channel.close_writer()
        with trio.move_on_after(2):
            try:
                await channel.run_writer()
            except StreamBroken:  # raised directly, not from a nursery
                pass
        await channel.aclose()

    async def _serve(self, stream: Any, peer_id: str, remote_ip: str | None) -> None:
        channel = FramedChannel(stream, max_frame=self.max_frame)
        calls: dict[int, _ServerCall] = {}
        mine = self._peer_calls.setdefault(peer_id, [])
        mine.append(calls)
        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(channel.run_writer)
                async with trio.open_nursery() as call_nursery:
                    async for item in channel.messages():
                        self._dispatch(item, channel, peer_id, calls, call_nursery,
                                       remote_ip)
                # The peer closed its side: in-flight calls have all answered.
                channel.close_writer()
        finally:
            mine.remove(calls)
            if not mine:
                self._peer_calls.pop(peer_id, None)
            await channel.aclose()

    def peer_gone(self, peer_id: str) -> int:
        """``peer_id``'s connection closed: cancel every call it has in
        flight (nobody is left to read the answers). Returns how many."""
        n = 0
        for calls in self._peer_calls.get(peer_id, []):
            for call in calls.values():
                call.client_cancelled = True
                call.cancel_scope.cancel()
                n += 1
        return n

    def _dispatch(
        self,
        item: wire.Message | wire.DecodeError,
        channel: FramedChannel,
        peer_id: str,
        calls: dict[int, _ServerCall],
        nursery: trio.Nursery,
        remote_ip: str | None = None,
    ) -> None:
        if isinstance(item, wire.DecodeError):
            self.stats.decode_errors += 1
            log.info("bad frame from %s: %s", peer_id, item.error.message)
            channel.send_error_nowait(item.call_id, item.error)
            return
        if isinstance(item, wire.Request):
            self._start_call(item, channel, peer_id, calls, nursery, remote_ip)
        elif isinstance(item, wire.Cancel):
            call = calls.get(item.id)
            if call is not None:
                call.client_cancelled = True
                call.cancel_scope.cancel()
        elif isinstance(item, wire.Credit):
            call = calls.get(item.id)
            if call is not None:
                call.add_credit(item.n)
        else:
            self.stats.decode_errors += 1
            channel.send_error_nowait(
                item.id, MalformedFrame(f"a client may not send {type(item).__name__} frames")
            )

    def _start_call(
        self,
        req: wire.Request,
        channel: FramedChannel,
        peer_id: str,
        calls: dict[int, _ServerCall],
        nursery: trio.Nursery,
        remote_ip: str | None = None,
    ) -> None:
        self.stats.calls += 1
        if req.id in calls:
            channel.send_error_nowait(req.id, MalformedFrame(f"call id {req.id} is in use"))
            return
        method = self.methods.get(req.method)
        if method is None:
            self._observe("_unknown", "unknown", 0.0)
            channel.send_error_nowait(req.id, UnknownMethod(f"no such method: {req.method!r}"))
            return
        is_member = self._is_member(peer_id)
        if method.access is Access.MEMBER and not is_member:
            self._observe(method.name, "denied", 0.0)
            self._refused("not_member")
            channel.send_error_nowait(
                req.id, NotMember(f"{req.method} is for network members only")
            )
            return
        grants = self.grants_for(peer_id, is_member)
        if method.grants and not method.grants & grants:
            self._observe(method.name, "denied", 0.0)
            self.stats.denied += 1
            self._refused("no_grant")
            channel.send_error_nowait(req.id, PermissionDenied(
                f"{req.method} needs a certificate granting "
                f"{' or '.join(sorted(method.grants))}",
                data={"needs": sorted(method.grants)}))
            return
        if len(calls) >= self.max_inflight:
            channel.send_error_nowait(
                req.id, TooManyStreams(f"at most {self.max_inflight} calls in flight per stream")
            )
            return
        credit = req.meta.get("credit", DEFAULT_STREAM_WINDOW)
        if type(credit) is not int or not 0 < credit <= 4096:
            credit = DEFAULT_STREAM_WINDOW
        call = _ServerCall(credit)
        if req.timeout is not None:
            call.cancel_scope.deadline = trio.current_time() + req.timeout
        calls[req.id] = call
        ctx = CallContext(
            peer_id=peer_id,
            remote_ip=remote_ip,
            method=req.method,
            call_id=req.id,
            is_member=is_member,
            grants=grants,
            request_id=valid_request_id(req.meta.get("rid")) or new_request_id(),
            meta=req.meta,
            deadline=call.cancel_scope.deadline,
            _scope=call.cancel_scope,
        )
        nursery.start_soon(self._run_call, method, ctx, req.params, call, channel, calls)

    async def _run_call(
        self,
        method: Method,
        ctx: CallContext,
        params: Any,
        call: _ServerCall,
        channel: FramedChannel,
        calls: dict[int, _ServerCall],
    ) -> None:
        token = current_request_id.set(ctx.request_id)
        started = trio.current_time()
        status = "success"
        try:
            with call.cancel_scope:
                try:
                    if method.streaming:
                        agen = method.func(ctx, params)
                        assert isinstance(agen, AsyncGenerator)
                        async with aclosing(agen):
                            async for item in agen:
                                await call.take_credit(self.stall_timeout)
                                channel.send_nowait(wire.Chunk(ctx.call_id, item))
                        channel.send_nowait(wire.End(ctx.call_id, ctx.trailer))
                    else:
                        result = await method.func(ctx, params)  # type: ignore[misc]
                        channel.send_nowait(wire.Response(ctx.call_id, result))
                except P2PInferError as exc:
                    status = status_of(exc)
                    if isinstance(exc, FrameTooLarge | HandlerError):
                        log.warning("%s from %s: %s", method.name, ctx.peer_id, exc.message)
                    channel.send_error_nowait(ctx.call_id, exc)
                except Exception as exc:
                    status = "error"
                    log.exception("handler %s failed (request %s)", method.name, ctx.request_id)
                    channel.send_error_nowait(
                        ctx.call_id,
                        HandlerError(f"{method.name} failed: {type(exc).__name__}"),
                    )
            if call.cancel_scope.cancelled_caught:
                if call.client_cancelled:
                    status = "cancelled"
                    channel.send_error_nowait(ctx.call_id, Cancelled("cancelled by the caller"))
                else:
                    status = "timeout"
                    channel.send_error_nowait(
                        ctx.call_id, DeadlineExceeded(f"{method.name} ran past its deadline")
                    )
        finally:
            calls.pop(ctx.call_id, None)
            current_request_id.reset(token)
            if status != "success":
                self.stats.errors += 1
            self._observe(method.name, status, trio.current_time() - started)

    def _observe(self, method: str, status: str, seconds: float) -> None:
        for observer in self.observers:
            try:
                observer(method, status, seconds)
            except Exception:
                log.exception("RPC observer failed")
