"""Gateway benchmark: client -> gateway -> worker, against calling the backend directly.

Nodes run as separate OS processes (a hub with auth + gateway, workers with
inference; three gateways for the limit test); this process is a client
peer with an API key, as any user's program would be. Prints ONE JSON object:

    overhead_p50_ms_c1    added latency at concurrency 1: gateway path p50 minus
                          the same request on the backend called directly
    overhead_p99_ms_c64   the same at p99 with 64 requests in flight (the direct
                          baseline also runs 64 at once); whole answers, as
                          ``client.inference`` asks for them (one chunk each)
    streamed_overhead_p99_ms_c64  the same with each answer streamed token by
                          token (``client.stream``: 16 chunks each)
    rps_max               highest requests/s seen (concurrency 64 and 256)
    c1000_ok, c1000_errors  1,000 requests in flight at once (each ~1 s long)
    limit_overshoot_ratio accepted / limit, one key hammered across three gateways
    real_*                the same comparison with the embedded SmolLM2 model

Usage: python benchmarks/bench_gateway.py [--quick] [--no-real-model]

Node processes tune the garbage collector as the daemon does
(:func:`p2pinfer.runtime.tune_gc`); ``BENCH_GC=default`` leaves CPython's
settings, ``BENCH_GC=700,10,10`` sets other thresholds. ``BENCH_STEPS_DIR=dir``
writes, per node process, the event-loop steps over 5 ms and the collections;
``BENCH_PROFILE_DIR=dir`` a cProfile of each.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, median, pct  # noqa: E402

from p2pinfer import errors  # noqa: E402
from p2pinfer.client import Client  # noqa: E402

PASSWORD = "benchmark password 42"
FAST = {"name": "fast", "backend": "synthetic", "tokens": 16, "token_delay": 0.0}
SLOW = {"name": "slow", "backend": "synthetic", "tokens": 10, "token_delay": 0.1}
OPEN_LIMITS = {"default_rate_limit": 10**9, "concurrent_per_key": 0, "concurrent_per_user": 0,
               "usage_flush_interval": 0.5}


# -- the node processes --------------------------------------------------------------
def serve(spec_path: str) -> None:
    """Child process: run a LocalSwarm slice described by a JSON spec."""
    from p2pinfer.swarm import LocalSwarm

    spec = json.loads(Path(spec_path).read_text())
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)

    async def main() -> None:
        swarm = LocalSwarm(Path(spec["base"]), spec["layout"], tables=spec["tables"])
        # run only our nodes; bootstrap to the hub's address if given
        from p2pinfer.node import Node

        async with trio.open_nursery() as nursery:
            out = {}
            for name in spec["run"]:
                cfg = swarm.config(name, spec.get("bootstrap", []))
                node = Node(cfg)
                await nursery.start(node.run)
                out[name] = node.addrs[0]
                if not spec.get("bootstrap"):
                    spec["bootstrap"] = [node.addrs[0]]
            gc_mode = os.environ.get("BENCH_GC", "tuned")
            if gc_mode != "default":
                from p2pinfer.runtime import GC_THRESHOLDS, tune_gc

                g0, g1, g2 = (int(x) for x in gc_mode.split(",")) if "," in gc_mode \
                    else GC_THRESHOLDS
                tune_gc((g0, g1, g2))
            # write, then rename: the parent polls for the file and must
            # never read it half written
            await trio.Path(spec["ready"] + ".tmp").write_text(json.dumps(out))
            await trio.Path(spec["ready"] + ".tmp").rename(spec["ready"])
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    steps_dir = os.environ.get("BENCH_STEPS_DIR")
    if steps_dir:
        run_with = _step_probe(Path(steps_dir) / f"{'-'.join(spec['run'])}.json")
        trio.run = run_with  # type: ignore[assignment]

    profile_dir = os.environ.get("BENCH_PROFILE_DIR")
    if profile_dir:  # python -m cProfile can't see a process ended by SIGTERM
        import cProfile

        profiler = cProfile.Profile()
        profiler.runcall(trio.run, main)
        profiler.dump_stats(os.path.join(profile_dir, f"{'-'.join(spec['run'])}.prof"))
    else:
        trio.run(main)


def _step_probe(out: Path) -> Any:
    """Which tasks hold this process's event loop for more than 5 ms, and how
    long each garbage collection takes (how the c64 tail was found). Written
    to ``out`` at exit: per task, the 12 longest steps (ms), their count and
    their total."""
    import atexit
    import gc
    from collections import defaultdict

    slow: dict[str, list[float]] = defaultdict(list)
    started = [0.0, 0.0]  # task step, collection

    class SlowSteps(trio.abc.Instrument):
        def before_task_step(self, task: Any) -> None:
            started[0] = time.perf_counter()

        def after_task_step(self, task: Any) -> None:
            dt = time.perf_counter() - started[0]
            if dt > 0.005:
                slow[task.name].append(round(dt * 1000, 1))

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[1] = time.perf_counter()
        else:
            slow[f"gc{info['generation']}"].append(
                round((time.perf_counter() - started[1]) * 1000, 1))

    def dump() -> None:
        summary = {k: sorted(v)[-12:] + [len(v), round(sum(v))] for k, v in slow.items()}
        out.write_text(json.dumps(summary, indent=1))

    gc.callbacks.append(on_gc)
    atexit.register(dump)
    run = trio.run
    return lambda fn: run(fn, instruments=[SlowSteps()])


class Cluster:
    def __init__(self, base: Path, layout: dict[str, list[str]], tables: dict[str, Any]) -> None:
        from p2pinfer.swarm import prepare_local_network

        self.base = base
        self.layout = layout
        self.tables = tables
        prepare_local_network(base, layout)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.addrs: dict[str, str] = {}

    def start(self, groups: list[list[str]]) -> None:
        """Start one process per group of node names; the first group first."""
        for i, group in enumerate(groups):
            ready = self.base / f"ready-{i}.json"
            spec = {"base": str(self.base), "layout": self.layout, "tables": self.tables,
                    "run": group, "ready": str(ready),
                    "bootstrap": [self.addrs[groups[0][0]]] if i else []}
            spec_path = self.base / f"spec-{i}.json"
            spec_path.write_text(json.dumps(spec))
            self.procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--serve", str(spec_path)],
                stdout=subprocess.DEVNULL, stderr=open(self.base / f"err-{i}.log", "wb")))
            deadline = time.monotonic() + 120
            while not ready.exists():
                if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((self.base / f"err-{i}.log").read_text()[-3000:])
                time.sleep(0.05)
            self.addrs.update(json.loads(ready.read_text()))

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


async def make_key(addr: str) -> str:
    """Register a user and issue an API key through the auth role's public RPC."""
    import multiaddr

    from p2pinfer.identity import Identity
    from p2pinfer.rpc import RpcClient, make_host

    host = make_host(Identity.generate())
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        async with RpcClient.open(host) as rpc:
            peer = await rpc.connect(addr)
            name = f"bench{int(time.time() * 1000) % 10**8}"
            await rpc.call(peer, "registerUser", {"username": name, "password": PASSWORD,
                                                  "email": f"{name}@example.com"})
            session = await rpc.call(peer, "loginUser", {"username": name,
                                                         "password": PASSWORD})
            key = await rpc.call(peer, "generateApiKey", {"token": session["token"]})
            return str(key["api_key"])


async def timed_requests(client: Client, model: str, n: int, concurrency: int,
                         prompt: str = "benchmark prompt", *, streamed: bool = False,
                         **kw: Any) -> tuple[list[float], int]:
    """Latencies of whole answers (``client.inference``: one chunk per
    answer), or with ``streamed`` of answers read token by token as they
    arrive (``client.stream``), until the last one."""
    lat: list[float] = []
    failures = 0
    per = max(1, n // concurrency)

    async def worker(w: int) -> None:
        nonlocal failures
        for i in range(per):
            t0 = time.perf_counter()
            try:
                if streamed:
                    async with client.stream(f"{prompt} {w} {i}", model=model, **kw) as s:
                        async for _ in s:
                            pass
                else:
                    await client.inference(f"{prompt} {w} {i}", model=model, **kw)
            except errors.P2PInferError:
                failures += 1
                continue
            lat.append(time.perf_counter() - t0)

    async with trio.open_nursery() as nursery:
        for w in range(concurrency):
            nursery.start_soon(worker, w)
    return lat, failures


async def direct_latencies(backend_spec: dict[str, Any], n: int, concurrency: int = 1,
                           **kw: Any) -> list[float]:
    """The same requests on the backend itself, in this process, with the same
    number in flight (so concurrency costs the backend has are not counted as
    gateway overhead)."""
    from p2pinfer.inference import GenerationParams, GenerationRequest, Message, SyntheticBackend

    backend = SyntheticBackend(backend_spec["name"], tokens=backend_spec["tokens"],
                               token_delay=backend_spec["token_delay"], slots=4096)
    lat: list[float] = []

    async def worker(w: int) -> None:
        for i in range(max(1, n // concurrency)):
            req = GenerationRequest(messages=(Message("user", f"benchmark prompt {w} {i}"),),
                                    params=GenerationParams(max_tokens=kw.get("max_tokens", 256)))
            t0 = time.perf_counter()
            async for _ in backend.generate(req):
                pass
            lat.append(time.perf_counter() - t0)

    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        await backend.wait_settled()
        async with trio.open_nursery() as workers:
            for w in range(concurrency):
                workers.start_soon(worker, w)
        nursery.cancel_scope.cancel()
    return lat


async def instant_backend(base: Path, quick: bool, out: dict[str, Any]) -> None:
    cluster = Cluster(base / "instant", {"hub": ["auth", "gateway"], "worker": ["inference"]},
                      {"models": [{**FAST, "slots": 4096}, {**SLOW, "slots": 4096}],
                       "gateway": OPEN_LIMITS, "inference": {"max_queue": 4096}})
    try:
        cluster.start([["hub"], ["worker"]])
        key = await make_key(cluster.addrs["hub"])
        async with Client(bootstrap=[cluster.addrs["hub"]], api_key=key) as client:
            with trio.fail_after(60):
                await client.wait_for_model("fast")
                await client.wait_for_model("slow")
            await timed_requests(client, "fast", 50, 1)  # warm up
            n1 = 200 if quick else 1000
            direct = await direct_latencies(FAST, n1)
            lat1, _ = await timed_requests(client, "fast", n1, 1)
            out["direct_p50_ms"] = round(median(direct) * 1e3, 3)
            out["gateway_p50_ms_c1"] = round(median(lat1) * 1e3, 3)
            out["overhead_p50_ms_c1"] = round((median(lat1) - median(direct)) * 1e3, 3)
            rps = {}
            for conc in (64, 256):
                n = (2000 if quick else 10000) if conc == 64 else (2560 if quick else 10240)
                t0 = time.perf_counter()
                lat, fails = await timed_requests(client, "fast", n, conc)
                rps[str(conc)] = round(len(lat) / (time.perf_counter() - t0))
                if conc == 64:
                    direct64 = await direct_latencies(FAST, n, 64)
                    out["direct_p99_ms_c64"] = round(pct(direct64, 0.99) * 1e3, 3)
                    out["gateway_p99_ms_c64"] = round(pct(lat, 0.99) * 1e3, 3)
                    out["overhead_p99_ms_c64"] = round(
                        (pct(lat, 0.99) - pct(direct64, 0.99)) * 1e3, 3)
                    out["overhead_p50_ms_c64"] = round(
                        (median(lat) - median(direct64)) * 1e3, 3)
                    out["errors_c64"] = fails
                    # the same, each answer read token by token as it streams
                    lat_s, fails_s = await timed_requests(client, "fast", n, 64, streamed=True)
                    out["streamed_overhead_p50_ms_c64"] = round(
                        (median(lat_s) - median(direct64)) * 1e3, 3)
                    out["streamed_overhead_p99_ms_c64"] = round(
                        (pct(lat_s, 0.99) - pct(direct64, 0.99)) * 1e3, 3)
                    out["streamed_errors_c64"] = fails_s
            out["rps"] = rps
            out["rps_max"] = max(rps.values())
            # 1,000 requests in flight at once, each about one second long
            t0 = time.perf_counter()
            lat, fails = await timed_requests(client, "slow", 1000, 1000)
            out["c1000_ok"] = len(lat)
            out["c1000_errors"] = fails
            out["c1000_wall_s"] = round(time.perf_counter() - t0, 2)
            out["c1000_p50_s"] = round(median(lat), 3)
    finally:
        cluster.stop()


async def overshoot(base: Path, quick: bool, out: dict[str, Any]) -> None:
    limit = 100
    layout = {"g1": ["auth", "gateway"], "g2": ["gateway"], "g3": ["gateway"],
              "worker": ["inference"]}
    cluster = Cluster(base / "limit", layout,
                      {"models": [{**FAST, "slots": 4096}],
                       "gateway": {"default_rate_limit": limit, "concurrent_per_key": 0,
                                   "concurrent_per_user": 0,
                                   "usage_flush_interval": 0.5}})
    try:
        cluster.start([["g1"], ["g2", "g3"], ["worker"]])
        key = await make_key(cluster.addrs["g1"])
        clients = [Client(bootstrap=[cluster.addrs[g]], api_key=key) for g in ("g1", "g2", "g3")]
        async with clients[0] as c1, clients[1] as c2, clients[2] as c3:
            # each client talks to its own gateway only: round-robin across three
            peers = {g: cluster.addrs[g].rsplit("/p2p/", 1)[1] for g in ("g1", "g2", "g3")}
            for c, g in zip((c1, c2, c3), ("g1", "g2", "g3"), strict=True):
                await c._rpc.connect(cluster.addrs[g])
                c._gateways = [peers[g]]
                c._gateways_at = trio.current_time() + 10**6
            with trio.fail_after(60):
                await c1.wait_for_model("fast")
            # every gateway must know the key before the hammering starts
            with trio.fail_after(30):
                for c in (c2, c3):
                    while True:
                        try:
                            await c.quota()
                            break
                        except errors.InvalidApiKey:
                            await trio.sleep(0.1)
            accepted = 0
            denied = 0
            total = 3 * limit

            async def one(i: int) -> None:
                nonlocal accepted, denied
                try:
                    await (c1, c2, c3)[i % 3].inference(f"q{i}", model="fast", max_tokens=4)
                    accepted += 1
                except errors.LimitError:
                    denied += 1

            async with trio.open_nursery() as nursery:
                limiter = trio.CapacityLimiter(48)

                async def limited(i: int) -> None:
                    async with limiter:
                        await one(i)

                for i in range(total):
                    nursery.start_soon(limited, i)
            out["limit"] = limit
            out["limit_accepted"] = accepted
            out["limit_denied"] = denied
            out["limit_overshoot_ratio"] = round(accepted / limit, 3)
    finally:
        cluster.stop()


async def real_model(base: Path, quick: bool, out: dict[str, Any]) -> None:
    from p2pinfer.inference import (
        GenerationParams,
        GenerationRequest,
        LlamaCppBackend,
        LlamaCppOptions,
        Message,
        embedded_model_path,
    )

    cluster = Cluster(base / "real", {"hub": ["auth", "gateway"], "worker": ["inference"]},
                      {"inference": {"slots": 1, "cache": False}, "gateway": OPEN_LIMITS})
    n = 5 if quick else 20
    try:
        cluster.start([["hub"], ["worker"]])
        key = await make_key(cluster.addrs["hub"])
        async with Client(bootstrap=[cluster.addrs["hub"]], api_key=key) as client:
            with trio.fail_after(60):
                await client.wait_for_model("smollm2")
            await timed_requests(client, "smollm2", 2, 1, max_tokens=16, temperature=0)
            via, _ = await timed_requests(client, "smollm2", n, 1, max_tokens=16, temperature=0)
        cluster.stop()
        backend = LlamaCppBackend("smollm2", LlamaCppOptions(path=embedded_model_path(), slots=1,
                                                             n_threads=1))
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            await backend.wait_settled()
            direct = []
            for i in range(n + 2):
                req = GenerationRequest(messages=(Message("user", f"benchmark prompt 0 {i}"),),
                                        params=GenerationParams(max_tokens=16, temperature=0.0))
                t0 = time.perf_counter()
                async for _ in backend.generate(req):
                    pass
                if i >= 2:
                    direct.append(time.perf_counter() - t0)
            nursery.cancel_scope.cancel()
        out["real_direct_p50_ms"] = round(median(direct) * 1e3, 1)
        out["real_gateway_p50_ms"] = round(median(via) * 1e3, 1)
        out["real_overhead_p50_ms"] = round((median(via) - median(direct)) * 1e3, 1)
    finally:
        cluster.stop()


async def main(quick: bool, real: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"quick": quick}
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        base = Path(tmp)
        await instant_backend(base, quick, out)
        await overshoot(base, quick, out)
        if real:
            await real_model(base, quick, out)
    out["goals"] = {
        "overhead_p50_ms_c1<=5": out["overhead_p50_ms_c1"] <= 5,
        "overhead_p99_ms_c64<=50": out["overhead_p99_ms_c64"] <= 50,
        "c1000_errors==0": out["c1000_errors"] == 0,
        "limit_overshoot_ratio<=1.05": out["limit_overshoot_ratio"] <= 1.05,
    }
    out["machine"] = machine()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="finish in under 60 s")
    parser.add_argument("--no-real-model", action="store_true", help="skip the SmolLM2 part")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    if args.serve:
        serve(args.serve)
    else:
        print(json.dumps(trio.run(main, args.quick, not args.no_real_model)))
