"""RPC benchmark: p2pinfer RPC over Noise + yamux versus the same framing on plain TCP.

The server runs in a separate OS process (as it would on another machine),
so client and server each get a core. Prints ONE JSON object:

    rtt_p50_ms, rtt_p99_ms       warm connection, small unary call, one at a time
    connect_ms                   TCP + Noise + yamux + first RPC stream (median)
    rps                          {"1", "16", "64", "256"}: unary calls/s at that concurrency
    stream_chunks_per_s          one server stream of small chunks
    tcp_floor_rtt_p50_ms         the same frames over plain trio TCP (the floor)
    rtt_over_floor               rtt_p50_ms / tcp_floor_rtt_p50_ms

Usage: python benchmarks/bench_rpc.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import multiaddr
import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, median, pct  # noqa: E402

from p2pinfer import wire  # noqa: E402
from p2pinfer.identity import Identity  # noqa: E402
from p2pinfer.rpc import RPC_PROTOCOL, CallContext, RpcClient, RpcServer, make_host  # noqa: E402
from p2pinfer.rpc.host import guard_handler  # noqa: E402

PAYLOAD = b"p" * 64


class Bench:
    async def rpc_echo(self, ctx: CallContext, params: Any) -> Any:
        return params

    async def rpc_chunks(self, ctx: CallContext, params: Any) -> Any:
        for i in range(int(params)):
            yield i


# -- the plain TCP floor: same frames, same decoder, no libp2p ------------------
async def tcp_handler(stream: trio.SocketStream) -> None:
    dec = wire.FrameDecoder()
    try:
        while True:
            data = await stream.receive_some(256 * 1024)
            if not data:
                return
            out = []
            for msg in dec.feed(data):
                if isinstance(msg, wire.Request):
                    out.append(wire.encode(wire.Response(msg.id, msg.params)))
            if out:
                await stream.send_all(b"".join(out))
    except trio.BrokenResourceError:
        return


class TcpClient:
    """Multiplexed calls over one TCP stream, like the RPC client does."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.pending: dict[int, trio.Event] = {}
        self.next_id = 1
        self.send_lock = trio.Lock()
        self.outbox: list[bytes] = []

    async def reader(self) -> None:
        dec = wire.FrameDecoder()
        while True:
            data = await self.stream.receive_some(256 * 1024)
            if not data:
                return
            for msg in dec.feed(data):
                ev = self.pending.pop(msg.id, None)  # type: ignore[union-attr]
                if ev is not None:
                    ev.set()

    async def call(self, params: Any) -> None:
        call_id = self.next_id
        self.next_id += 1
        ev = trio.Event()
        self.pending[call_id] = ev
        self.outbox.append(wire.encode(wire.Request(call_id, "echo", params, None, {})))
        async with self.send_lock:  # coalesce queued frames like the RPC writer
            if self.outbox:
                data, self.outbox = b"".join(self.outbox), []
                await self.stream.send_all(data)
        await ev.wait()


async def serve() -> None:
    host = make_host(Identity.generate())
    server = RpcServer(is_member=lambda p: True, max_inflight=4096)
    server.register(Bench())
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        host.set_stream_handler(RPC_PROTOCOL, guard_handler("rpc", server.handle_stream))
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, tcp_handler, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            print(json.dumps({"addr": str(host.get_addrs()[0]), "tcp_port": port}), flush=True)
            await trio.sleep_forever()


async def measure_rps(call: Any, concurrency: int, total: int) -> float:
    per = max(1, total // concurrency)

    async def worker() -> None:
        for _ in range(per):
            await call()

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return per * concurrency / (time.perf_counter() - t0)


async def client(info: dict[str, Any], quick: bool) -> dict[str, Any]:
    n_rtt = 500 if quick else 3000
    n_rps = 2000 if quick else 10000
    n_connect = 10 if quick else 40
    n_chunks = 5000 if quick else 30000
    out: dict[str, Any] = {"quick": quick}

    # connect: a fresh client host each time (TCP + Noise + yamux + RPC stream)
    connects = []
    for _ in range(n_connect):
        host = make_host(Identity.generate())
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            async with RpcClient.open(host) as c:
                t0 = time.perf_counter()
                peer = await c.connect(info["addr"])
                await c.call(peer, "echo", PAYLOAD)
                connects.append(time.perf_counter() - t0)
    out["connect_ms"] = round(median(connects) * 1e3, 3)

    host = make_host(Identity.generate())
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        async with RpcClient.open(host) as c:
            peer = await c.connect(info["addr"])
            for _ in range(200):  # warm up
                await c.call(peer, "echo", PAYLOAD)
            rtts = []
            for _ in range(n_rtt):
                t0 = time.perf_counter()
                await c.call(peer, "echo", PAYLOAD)
                rtts.append(time.perf_counter() - t0)
            out["rtt_p50_ms"] = round(median(rtts) * 1e3, 3)
            out["rtt_p99_ms"] = round(pct(rtts, 0.99) * 1e3, 3)
            out["rps"] = {}
            for conc in (1, 16, 64, 256):
                total = n_rps if conc > 1 else n_rps // 4
                out["rps"][str(conc)] = round(
                    await measure_rps(lambda: c.call(peer, "echo", PAYLOAD), conc, total)
                )
            t0 = time.perf_counter()
            async with c.stream(peer, "chunks", n_chunks) as s:
                count = 0
                async for _ in s:
                    count += 1
            out["stream_chunks_per_s"] = round(count / (time.perf_counter() - t0))

    stream = await trio.open_tcp_stream("127.0.0.1", info["tcp_port"])
    tcp = TcpClient(stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tcp.reader)
        for _ in range(200):
            await tcp.call(PAYLOAD)
        rtts = []
        for _ in range(n_rtt):
            t0 = time.perf_counter()
            await tcp.call(PAYLOAD)
            rtts.append(time.perf_counter() - t0)
        out["tcp_floor_rtt_p50_ms"] = round(median(rtts) * 1e3, 3)
        nursery.cancel_scope.cancel()
    await stream.aclose()
    out["rtt_over_floor"] = round(out["rtt_p50_ms"] / out["tcp_floor_rtt_p50_ms"], 2)
    out["goals"] = {
        "rtt_p50_ms<=2": out["rtt_p50_ms"] <= 2,
        "rps64>=1000": out["rps"]["64"] >= 1000,
    }
    out["machine"] = machine()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="finish in well under 60 s")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    if args.serve:
        trio.run(serve)
        return
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        result = trio.run(client, info, args.quick)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
