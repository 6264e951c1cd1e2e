"""Local RPC benchmark: the asyncio client (an HTTP worker) calling its trio
node over the node's unix socket (p2pinfer.rpc.aio -> p2pinfer.rpc.local_socket).

The server runs in its own process pinned to CPU 0 and the client to CPU 1
(when there are two), as a node and one HTTP worker would run. The client
uses uvloop when it is installed, as uvicorn does. Prints ONE JSON object:

    loop                         "uvloop" or "asyncio"
    rtt_p50_ms, rtt_p99_ms       empty unary call, one at a time
    rps                          {"1", "16", "64"}: empty unary calls/s at that many
                                 in flight, on one connection
    stream16_p50_ms              a 16-chunk stream, request to trailer
    client_cpu_us_per_call_64    the client process's CPU time per call at 64 in flight
    uncoalesced                  the same figures with one transport.write per frame
                                 (AioRpcClient(coalesce=False))

Each figure is the median over several rounds in which the two write modes
alternate.

Usage: python benchmarks/bench_local_rpc.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, median, pct  # noqa: E402

from p2pinfer.rpc.aio import AioRpcClient  # noqa: E402

SERVER_CPU = 0
CLIENT_CPU = 1


def pin(cpu: int) -> int | None:
    """Pin this process to ``cpu`` if the machine has it; returns the CPU used."""
    if not hasattr(os, "sched_setaffinity") or cpu not in os.sched_getaffinity(0):
        return None
    if len(os.sched_getaffinity(0)) < 2:
        return None
    os.sched_setaffinity(0, {cpu})
    return cpu


# -- the node side (a separate process) -------------------------------------------
class Bench:
    async def rpc_empty(self, ctx: Any, params: Any) -> Any:
        return None

    async def rpc_chunks(self, ctx: Any, params: Any) -> AsyncIterator[int]:
        for i in range(int(params)):
            yield i


def serve(path: str) -> None:
    import trio

    from p2pinfer.rpc import RpcServer
    from p2pinfer.rpc.local_socket import serve_local

    pinned = pin(SERVER_CPU)

    async def main() -> None:
        server = RpcServer(is_member=lambda p: True, max_inflight=4096)
        server.register(Bench())
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_local, server, Path(path), "bench-node")
            print(json.dumps({"ready": True, "cpu": pinned}), flush=True)

    trio.run(main)


# -- the worker side ----------------------------------------------------------------
async def rtts(client: AioRpcClient, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await client.call("empty")
        out.append(time.perf_counter() - t0)
    return out


async def rps(call: Callable[[], Awaitable[Any]], in_flight: int, total: int) -> float:
    per = max(1, total // in_flight)

    async def worker() -> None:
        for _ in range(per):
            await call()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return per * in_flight / (time.perf_counter() - t0)


async def one_round(path: str, coalesce: bool, quick: bool) -> dict[str, float]:
    """Every figure once, on a fresh connection."""
    n_rtt = 800 if quick else 5000
    n_rps = 6000 if quick else 40000
    n_stream = 100 if quick else 1000
    out: dict[str, float] = {}
    async with await AioRpcClient.connect(path, coalesce=coalesce) as client:
        await rtts(client, 300)  # warm up
        samples = await rtts(client, n_rtt)
        out["rtt_p50_ms"] = median(samples) * 1e3
        out["rtt_p99_ms"] = pct(samples, 0.99) * 1e3
        for in_flight in (1, 16, 64):
            total = n_rps // 4 if in_flight == 1 else n_rps
            out[f"rps{in_flight}"] = await rps(lambda: client.call("empty"), in_flight, total)
        cpu0 = os.times()
        await rps(lambda: client.call("empty"), 64, n_rps)
        cpu1 = os.times()
        used = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        out["client_cpu_us_per_call_64"] = used / n_rps * 1e6
        streams = []
        for _ in range(n_stream):
            t0 = time.perf_counter()
            async with client.stream("chunks", 16) as s:
                async for _chunk in s:
                    pass
            streams.append(time.perf_counter() - t0)
        out["stream16_p50_ms"] = median(streams) * 1e3
    return out


def summary(rounds: list[dict[str, float]]) -> dict[str, Any]:
    """The median of each figure over the rounds."""
    def mid(key: str, digits: int) -> float:
        return round(median([r[key] for r in rounds]), digits)

    return {
        "rtt_p50_ms": mid("rtt_p50_ms", 4),
        "rtt_p99_ms": mid("rtt_p99_ms", 4),
        "rps": {str(n): round(mid(f"rps{n}", 0)) for n in (1, 16, 64)},
        "stream16_p50_ms": mid("stream16_p50_ms", 4),
        "client_cpu_us_per_call_64": mid("client_cpu_us_per_call_64", 2),
    }


async def measure(path: str, quick: bool) -> dict[str, Any]:
    # The two write modes alternate, so a slow spell (a shared machine)
    # hits both alike; each figure is the median over the rounds.
    n_rounds = 3 if quick else 7
    coalesced: list[dict[str, float]] = []
    uncoalesced: list[dict[str, float]] = []
    for _ in range(n_rounds):
        coalesced.append(await one_round(path, True, quick))
        uncoalesced.append(await one_round(path, False, quick))
    return {**summary(coalesced), "rounds": n_rounds, "uncoalesced": summary(uncoalesced)}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="finish in under 15 s")
    parser.add_argument("--serve", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="p2pl-") as tmp:  # mode 0700, ours
        path = os.path.join(tmp, "node.sock")
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", path],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            ready = json.loads(proc.stdout.readline())
            client_cpu = pin(CLIENT_CPU)
            try:
                import uvloop
            except ImportError:
                loop = "asyncio"
                result = asyncio.run(measure(path, args.quick))
            else:
                loop = "uvloop"
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    result = runner.run(measure(path, args.quick))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    out = {"quick": args.quick, "loop": loop, **result,
           "cpus": {"server": ready.get("cpu"), "client": client_cpu},
           "seconds": round(time.perf_counter() - started, 1), "machine": machine()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
