"""RPC between two real libp2p hosts on loopback."""

from __future__ import annotations

import logging
import struct
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import multiaddr
import pytest
import trio
import trio.lowlevel
import trio.testing

from p2pinfer import errors, wire
from p2pinfer.identity import Identity
from p2pinfer.rpc import (
    RPC_PROTOCOL,
    Access,
    CallContext,
    RpcClient,
    RpcServer,
    make_host,
    rpc_method,
)
from p2pinfer.rpc.host import guard_handler

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


class Service:
    def __init__(self) -> None:
        self.generator_closed = trio.Event()
        self.produced = 0
        self.saw_deadline: float | None = None
        self.slow_cancelled = trio.Event()

    async def rpc_echo(self, ctx: CallContext, params: Any) -> Any:
        return {"params": params, "rid": ctx.request_id, "member": ctx.is_member}

    async def rpc_count(self, ctx: CallContext, params: Any) -> AsyncIterator[int]:
        for i in range(int(params)):
            yield i
        ctx.trailer = {"total": int(params)}

    async def rpc_endless(self, ctx: CallContext, params: Any) -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                self.produced = i
                yield i
                i += 1
                await trio.lowlevel.checkpoint()
        finally:
            self.generator_closed.set()

    async def rpc_boom(self, ctx: CallContext, params: Any) -> Any:
        raise ValueError("internal detail")

    async def rpc_limited(self, ctx: CallContext, params: Any) -> Any:
        raise errors.RateLimited("slow down", data={"retry_after": 3})

    async def rpc_slow(self, ctx: CallContext, params: Any) -> Any:
        self.saw_deadline = ctx.remaining()
        try:
            await trio.sleep(30)
        finally:
            self.slow_cancelled.set()

    async def rpc_big(self, ctx: CallContext, params: Any) -> Any:
        return b"x" * int(params)

    @rpc_method("public.hello", access=Access.PUBLIC)
    async def rpc_hello(self, ctx: CallContext, params: Any) -> Any:
        return "hi"


class Pair(tuple):  # type: ignore[type-arg]
    """(server_host, server, client, peer) plus named extras."""

    def __new__(cls, server_host: Any, server: RpcServer, client: RpcClient, peer: str,
                service: Service, members: set[str], client_host: Any) -> Pair:
        self = super().__new__(cls, (server_host, server, client, peer))
        self.service, self.members, self.client_host = service, members, client_host
        return self


@pytest.fixture
async def pair(nursery: trio.Nursery) -> AsyncIterator[Pair]:
    members: set[str] = set()
    server_host = make_host(Identity.generate())
    client_host = make_host(Identity.generate())
    server = RpcServer(is_member=lambda p: p in members, max_frame=64 * 1024,
                       max_streams_per_peer=4)
    service = Service()
    server.register(service)
    async with server_host.run(listen_addrs=LOOPBACK), client_host.run(listen_addrs=LOOPBACK):
        server_host.set_stream_handler(RPC_PROTOCOL, guard_handler("rpc", server.handle_stream))
        async with RpcClient.open(client_host, max_frame=64 * 1024) as client:
            peer = await client.connect(str(server_host.get_addrs()[0]))
            members.add(client_host.get_id().to_base58())
            yield Pair(server_host, server, client, peer, service, members, client_host)


async def test_unary_and_stream_roundtrip(pair: Any) -> None:
    _, _, client, peer = pair
    with trio.fail_after(10):
        out = await client.call(peer, "echo", {"x": [1, b"\x00"]})
        assert out["params"] == {"x": [1, b"\x00"]} and out["member"] is True
        async with client.stream(peer, "count", 100) as s:
            items = [i async for i in s]
        assert items == list(range(100))
        assert s.trailer == {"total": 100}


async def test_errors_keep_their_code_and_node_keeps_serving(pair: Any) -> None:
    _, _, client, peer = pair
    with trio.fail_after(10):
        with pytest.raises(errors.UnknownMethod):
            await client.call(peer, "noSuchMethod")
        with pytest.raises(errors.HandlerError) as ei:
            await client.call(peer, "boom")
        assert "internal detail" not in ei.value.message
        with pytest.raises(errors.RateLimited) as rl:
            await client.call(peer, "limited")
        assert rl.value.retry_after == 3
        with pytest.raises(errors.FrameTooLarge):
            await client.call(peer, "big", 100_000)  # the reply would be too large
        with pytest.raises(errors.FrameTooLarge):
            await client.call(peer, "echo", b"y" * 100_000)  # the request is
        assert (await client.call(peer, "echo", 1))["params"] == 1


async def raw_exchange(host: Any, peer: str, payload: bytes, n_replies: int) -> list[Any]:
    from libp2p.peer.id import ID

    stream = await host.new_stream(ID.from_base58(peer), [RPC_PROTOCOL])
    await stream.write(payload)
    dec = wire.FrameDecoder()
    out: list[Any] = []
    while len(out) < n_replies:
        out.extend(dec.feed(await stream.read(65536)))
    await stream.close()
    return out


def raw_frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


async def test_bad_frames_each_get_their_own_code(pair: Any) -> None:
    _, _, client, peer = pair
    good = wire.encode(wire.Request(99, "echo", "ok", None, {}))
    cases = [
        (struct.pack(">I", 4) + b"\xc1\xc1\xc1\xc1", errors.MalformedFrame.code),
        (struct.pack(">I", 1_000_000) + b"\0" * 1_000_000, errors.FrameTooLarge.code),
        (raw_frame([7, 1, 5, "echo", None, None, {}]), errors.UnsupportedVersion.code),
        (wire.encode(wire.Request(5, "nope", None, None, {})), errors.UnknownMethod.code),
        (wire.encode(wire.Response(5, None)), errors.MalformedFrame.code),
    ]
    with trio.fail_after(20):
        for payload, code in cases:
            replies = await raw_exchange(pair.client_host, peer, payload + good, 2)
            assert isinstance(replies[0], wire.Error) and replies[0].code == code, replies
            assert isinstance(replies[1], wire.Response) and replies[1].result["params"] == "ok"
        assert (await client.call(peer, "echo", 2))["params"] == 2


async def test_cancel_reaches_server_generator(pair: Any) -> None:
    _, server, client, peer = pair
    service = pair.service
    with trio.fail_after(10):
        async with client.stream(peer, "endless", None, window=8) as s:
            async for i in s:
                if i == 20:
                    break
        await service.generator_closed.wait()
    # Backpressure: the server never ran more than one window ahead of us.
    assert service.produced <= 20 + 8 + 1


async def test_caller_cancellation_and_deadline_reach_server(pair: Any) -> None:
    _, _, client, peer = pair
    service = pair.service
    with trio.move_on_after(0.5):
        await client.call(peer, "slow")
    assert service.saw_deadline is not None and 0 < service.saw_deadline <= 0.5
    with trio.fail_after(5):
        await service.slow_cancelled.wait()


async def test_server_deadline_error(pair: Any) -> None:
    _, _, client, peer = pair
    # The server learns the remaining time and enforces it even if the
    # client forgets to: ask for 0.2 s, then wait on the reply with no limit.
    with trio.fail_after(5):
        channel = await client._channel_for(peer)
        from p2pinfer.rpc.client import _Unary

        pending = _Unary()
        channel.pending[4242] = pending
        channel.channel.send_nowait(wire.Request(4242, "slow", None, 0.2, {}))
        await pending.event.wait()
    assert isinstance(pending.error, errors.DeadlineExceeded)


async def test_member_only_methods(pair: Any) -> None:
    _, _, client, peer = pair
    pair.members.clear()
    with trio.fail_after(5):
        with pytest.raises(errors.NotMember):
            await client.call(peer, "echo", 1)
        assert await client.call(peer, "public.hello") == "hi"


async def test_request_id_propagates(pair: Any) -> None:
    from p2pinfer.tracing import current_request_id

    _, _, client, peer = pair
    token = current_request_id.set("req-123")
    try:
        out = await client.call(peer, "echo", None)
    finally:
        current_request_id.reset(token)
    assert out["rid"] == "req-123"


async def test_per_peer_stream_limit(pair: Any) -> None:
    from libp2p.peer.id import ID

    server_host, server, client, peer = pair
    streams = [await pair.client_host.new_stream(ID.from_base58(peer), [RPC_PROTOCOL])
               for _ in range(4)]  # the client's own channel is one more
    with trio.fail_after(5):
        replies = await raw_exchange(pair.client_host, peer, b"", 1)
    assert replies[0].code == errors.TooManyStreams.code
    for s in streams:
        await s.close()
    assert (await client.call(peer, "echo", 3))["params"] == 3


async def test_concurrent_calls_multiplex(pair: Any) -> None:
    _, _, client, peer = pair
    results: list[int] = []

    async def one(i: int) -> None:
        results.append((await client.call(peer, "echo", i))["params"])

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(one, i)
    assert sorted(results) == list(range(300))


async def test_peer_death_fails_pending_calls(nursery: trio.Nursery,
                                              caplog: pytest.LogCaptureFixture) -> None:
    server_host = make_host(Identity.generate())
    client_host = make_host(Identity.generate())
    server = RpcServer(is_member=lambda p: True)
    server.register(Service())
    async with client_host.run(listen_addrs=LOOPBACK), RpcClient.open(client_host) as client:
        with trio.CancelScope() as server_scope:
            async with server_host.run(listen_addrs=LOOPBACK):
                server_host.set_stream_handler(
                    RPC_PROTOCOL, guard_handler("rpc", server.handle_stream)
                )
                peer = await client.connect(str(server_host.get_addrs()[0]))

                async def call_then_kill() -> None:
                    await trio.sleep(0.3)
                    server_scope.cancel()

                nursery.start_soon(call_then_kill)
                with trio.fail_after(10), pytest.raises(errors.CallError):
                    await client.call(peer, "slow")
        with trio.fail_after(10), pytest.raises(errors.CallError):
            await client.call(peer, "echo", 1)
    # a peer going away is an ordinary event: no error-level log, no traceback
    assert not [r for r in caplog.records
                if r.name.startswith("p2pinfer") and r.levelno >= logging.ERROR]


async def test_plaintext_dialer_is_refused(pair: Any) -> None:
    from libp2p import new_host
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

    server_host = pair[0]
    kp = Identity.generate().key_pair()
    plain = new_host(key_pair=kp, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(kp)})
    async with plain.run(listen_addrs=LOOPBACK):
        info = info_from_p2p_addr(server_host.get_addrs()[0])
        with trio.fail_after(15), pytest.raises(Exception) as ei:
            await plain.connect(info)
        assert plain.get_network().connections.get(info.peer_id) in (None, [], {})
    assert ei.value is not None


async def test_a_burst_is_handed_on_in_groups_so_work_can_start_early() -> None:
    """64 frames read in one piece reach the consumer in order and complete,
    in groups of DISPATCH_GROUP with a scheduling point between groups: a
    task woken by the first frames runs before the last ones are handed on
    (a burst does not cross client, gateway and worker as one convoy)."""
    from p2pinfer.rpc.channel import DISPATCH_GROUP, FramedChannel
    from p2pinfer.rpc.local import memory_stream_pair

    a, b = memory_stream_pair()
    burst = b"".join(wire.encode(wire.Response(i, i)) for i in range(1, 65))
    await a.write(burst)  # one read on the other side gets all 64
    await a.close()
    seen: list[int] = []
    progress_when_woken: list[int] = []
    woken = trio.Event()

    async def woken_by_the_first_frame() -> None:
        await woken.wait()
        progress_when_woken.append(len(seen))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(woken_by_the_first_frame)
        await trio.testing.wait_all_tasks_blocked()
        async for item in FramedChannel(b).messages():
            assert isinstance(item, wire.Response)
            seen.append(item.id)
            woken.set()
    assert seen == list(range(1, 65))
    # it runs at the first scheduling point or the next (trio may order a
    # batch either way); without the groups it would run only after all 64
    assert progress_when_woken and progress_when_woken[0] <= 2 * DISPATCH_GROUP < 64


def test_throttles_count_an_ipv6_host_by_its_64() -> None:
    """A peer id is free to change, and so is an address inside one's /64."""
    from p2pinfer.rpc.server import CallContext, throttle_address

    assert throttle_address("203.0.113.9") == "203.0.113.9"
    assert throttle_address("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert throttle_address("2001:db8:1:2:bbbb::7") == "2001:db8:1:2::/64"
    assert throttle_address("::ffff:198.51.100.4") == "198.51.100.4"
    ctx = CallContext(peer_id="12D3KooWx", method="m", call_id=1, is_member=False,
                      request_id="r", remote_ip="2001:db8:1:2:cccc::9")
    assert ctx.source == "ip:2001:db8:1:2::/64"
    assert CallContext(peer_id="12D3KooWx", method="m", call_id=1, is_member=False,
                       request_id="r").source == "peer:12D3KooWx"
