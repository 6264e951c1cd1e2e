"""HTTP front door benchmark: an instant OpenAI-compatible server called
directly, and the same kind of request through a swarm's HTTP front door.

The swarm: a hub process (auth, gateway and web: the front door) and a
worker process (inference). The mock is an aiohttp server in its own
process answering ``POST /v1/chat/completions`` at once with 16 tokens,
whole or streamed as server-sent events; the worker's model is an
OpenAI-compatible backend on that mock (``--backend openai``, the default)
or the instant synthetic backend (``--backend synthetic``, 16 tokens), so
that the worker can be taken out of the question.

The load generator is this process: aiohttp's client on asyncio (httpx's
pool is itself the bottleneck at high concurrency), closed loop, ``c``
requests in flight, each reading its whole answer (streamed answers until
the last event). Every cell runs for ``--seconds`` after a short warm-up.

The same whole answers are then asked over libp2p by an SDK client, so
that both ways into a swarm are compared in one run.

The front door (``--workers`` front-door processes, 2 by default; 0 serves
inside the hub) is measured on one core (the hub and every process it
starts pinned to the first CPU; the worker, the mock and this process on
the second), then on two (everything may use both). Prints ONE JSON
object; among its keys:

    rps_c64_1core               req/s through the front door, 64 in flight, one core
    overhead_p99_ms_c64_1core   its p99 minus the mock's own p99 at 64 in flight
    overhead_p50_ms_c1          p50 through the front door minus the mock's, 1 in flight
    rps_c64_2core               as rps_c64_1core, the front door on two cores
    cpu_ms_per_answer_c64_1core CPU ms per answer of the hub, its front doors, the
                                worker, the mock and the load generator
    core_busy_c64_1core         share of each core used in that cell: the front
                                door's (hub, front doors) and the other (the rest)
    scaling_2core_bound         the most rps_c64_2core / rps_c64_1core can be with
                                those CPU costs (see core_figures)
    p2p_rps_c64_1core, p2p_rps_c64_2core, p2p_overhead_p50_ms_c1,
    p2p_overhead_p99_ms_c64_1core, p2p_cpu_ms_per_answer_c64_1core
                                the same whole answers over libp2p, from the SDK
                                (``Client(bootstrap=...)`` in a process of its own,
                                placed as the load generator), same swarm and layouts
    http_over_p2p               rps through the front door over rps over libp2p, per layout
    hub_cpu_ms_per_answer_c64_1core  the hub's CPU per answer on either path
    c1000_errors                1,000 requests in flight at once: how many failed
    cells                       every cell: target, mode, concurrency, p50, p99, req/s

Usage: python benchmarks/bench_http.py [--quick] [--backend openai|synthetic] [--workers N]
[--profile DIR] (needs aiohttp and py-spy: pip install -e '.[bench]'; ``--profile``
records every process of the swarm with py-spy during the one-core c64 cell).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, median, pct  # noqa: E402

HERE = Path(__file__).resolve().parent
TOKENS = 16
CONCURRENCY = (1, 16, 64, 256)
PASSWORD = "benchmark password 42"


# -- the mock: an instant OpenAI-compatible server ----------------------------------
def run_mock(port_file: str) -> None:
    """Child process: serve the mock on 127.0.0.1 and write its port."""
    from aiohttp import web

    words = ["tok"] * TOKENS
    whole = json.dumps({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": "mock",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": " ".join(words)}}],
        "usage": {"prompt_tokens": 8, "completion_tokens": TOKENS,
                  "total_tokens": 8 + TOKENS}}).encode()
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    events += [{"choices": [{"index": 0, "delta": {"content": (" " if i else "") + w}}]}
               for i, w in enumerate(words)]
    events += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
               {"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": TOKENS,
                                         "total_tokens": 8 + TOKENS}}]
    stream = b"".join(
        b"data: " + json.dumps({"id": "chatcmpl-mock", "object": "chat.completion.chunk",
                                "created": 0, "model": "mock", **e}).encode() + b"\n\n"
        for e in events) + b"data: [DONE]\n\n"

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.Response(body=whole, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(stream)
        await resp.write_eof()
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "mock", "object": "model", "owned_by": "bench", "context_length": 8192}]})

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/v1/models", models)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        publish(port_file, str(port))
        await asyncio.Event().wait()

    asyncio.run(main())


def publish(path: str, text: str) -> None:
    """Write, then rename: the parent polls for the file and must never
    read it half written."""
    Path(path + ".tmp").write_text(text)
    os.rename(path + ".tmp", path)


# -- processes and cores ----------------------------------------------------------------
def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` and of its children (front-door workers
    a node starts) to ``cpus``."""
    import psutil  # type: ignore[import-untyped]

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for proc in procs:
        for thread in proc.threads():
            try:
                os.sched_setaffinity(thread.id, cpus)
            except OSError:
                pass  # the thread ended


def start(args: list[str], cpus: set[int], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
                            preexec_fn=lambda: os.sched_setaffinity(0, cpus))


def wait_file(path: Path, proc: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + 120
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(log.read_text()[-3000:])
        time.sleep(0.05)
    return path.read_text()


class Swarm:
    """The mock, the hub (front door) and the worker, each its own process."""

    def __init__(self, base: Path, backend: str, hub_cpus: set[int], rest: set[int],
                 workers: int) -> None:
        from p2pinfer.swarm import prepare_local_network

        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []
        port_file = base / "mock.port"
        self.mock = start([sys.executable, __file__, "--mock", str(port_file)], rest,
                          base / "mock.log")
        self.procs.append(self.mock)
        self.mock_url = f"http://127.0.0.1:{wait_file(port_file, self.mock, base / 'mock.log')}"
        if backend == "openai":
            model = {"name": "mock", "backend": "openai", "url": f"{self.mock_url}/v1",
                     "slots": 4096}
        else:
            model = {"name": "mock", "backend": "synthetic", "tokens": TOKENS,
                     "token_delay": 0.0, "slots": 4096}
        layout = {"hub": ["auth", "gateway", "web"], "worker": ["inference"]}
        prepare_local_network(base, layout)
        self.web_port = free_port()
        tables = {"models": [model], "inference": {"max_queue": 8192},
                  "gateway": {"default_rate_limit": 10**9, "concurrent_per_key": 0,
                              "concurrent_per_user": 0, "usage_flush_interval": 0.5},
                  "auth": {"registration_wait": 0},
                  "web": {"port": self.web_port, "request_timeout": 120.0,
                          "workers": workers}}
        self.addrs: dict[str, str] = {}
        self.hub = self._node(["hub"], layout, tables, hub_cpus, 0)
        self.worker = self._node(["worker"], layout, tables, rest, 1)
        self.pids = {"hub": self.hub.pid, "worker": self.worker.pid, "mock": self.mock.pid}

    def _node(self, run: list[str], layout: dict[str, list[str]], tables: dict[str, Any],
              cpus: set[int], i: int) -> subprocess.Popen[bytes]:
        ready = self.base / f"ready-{i}.json"
        spec = {"base": str(self.base), "layout": layout, "tables": tables, "run": run,
                "ready": str(ready), "bootstrap": [self.addrs["hub"]] if i else []}
        spec_path = self.base / f"spec-{i}.json"
        spec_path.write_text(json.dumps(spec))
        log = self.base / f"node-{i}.log"
        proc = start([sys.executable, str(HERE / "bench_gateway.py"), "--serve",
                      str(spec_path)], cpus, log)
        self.procs.append(proc)
        self.addrs.update(json.loads(wait_file(ready, proc, log)))
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the load generator -------------------------------------------------------------------
async def account(base_url: str) -> str:
    """Register a user over HTTP and issue an API key."""
    import aiohttp

    name = f"bench{int(time.time() * 1000) % 10**8}"
    async with aiohttp.ClientSession(base_url) as http:
        async with http.post("/api/auth/register", json={
                "username": name, "email": f"{name}@example.com", "password": PASSWORD}) as r:
            assert r.status < 300, await r.text()
        async with http.post("/api/auth/login",
                             json={"username": name, "password": PASSWORD}) as r:
            token = (await r.json())["token"]
        async with http.post("/api/auth/api-keys", json={"name": "bench"},
                             headers={"Authorization": f"Bearer {token}"}) as r:
            return str((await r.json())["api_key"])


async def wait_ready(base_url: str, key: str) -> None:
    import aiohttp

    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession(base_url) as http:
        while True:
            async with http.post("/v1/chat/completions", json=body(False),
                                 headers={"Authorization": f"Bearer {key}"}) as r:
                if r.status == 200:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"front door not ready: {r.status} {await r.text()}")
            await asyncio.sleep(0.2)


def body(stream: bool) -> dict[str, Any]:
    return {"model": "mock", "messages": [{"role": "user", "content": "benchmark prompt"}],
            "max_tokens": TOKENS, "stream": stream}


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each part of the swarm
    (``pids``: hub, worker, mock) and by this process (the load generator)."""
    import psutil  # type: ignore[import-untyped]

    def used(proc: Any) -> float:
        times = proc.cpu_times()
        return float(times.user + times.system)

    hub = psutil.Process(pids["hub"])
    return {"hub": used(hub),
            "front_doors": sum(used(c) for c in hub.children(recursive=True)),
            "worker": used(psutil.Process(pids["worker"])),
            "mock": used(psutil.Process(pids["mock"])),
            "load_generator": used(psutil.Process())}


def per_answer(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    return {k: round((after[k] - before[k]) * 1e3 / n, 3) for k in after}


async def cell(url: str, headers: dict[str, str], stream: bool, concurrency: int,
               seconds: float, warmup: float = 0.3,
               swarm: Swarm | None = None) -> dict[str, Any]:
    """``concurrency`` requests in flight for ``seconds`` (after a warm-up):
    latencies of complete answers, req/s, errors; with ``swarm``, also the
    CPU milliseconds each of its processes spent per answer."""
    import aiohttp

    payload = json.dumps(body(stream)).encode()
    hdrs = {**headers, "Content-Type": "application/json"}
    lat: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        start = time.perf_counter()
        measure_from = start + warmup
        stop_at = measure_from + seconds

        async def loop() -> None:
            nonlocal errors
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                try:
                    async with http.post(url, data=payload, headers=hdrs) as r:
                        await r.read()
                        ok = r.status == 200
                except (TimeoutError, aiohttp.ClientError):
                    ok = False
                t1 = time.perf_counter()
                if t0 >= measure_from:
                    if ok:
                        lat.append(t1 - t0)
                    else:
                        errors += 1

        before: dict[str, float] = {}

        async def snapshot() -> None:
            await asyncio.sleep(warmup)
            if swarm is not None:
                before.update(cpu_seconds(swarm.pids))

        await asyncio.gather(snapshot(), *(loop() for _ in range(concurrency)))
        wall = time.perf_counter() - measure_from
    out: dict[str, Any] = {
        "p50_ms": round(median(lat) * 1e3, 3), "p99_ms": round(pct(lat, 0.99) * 1e3, 3),
        "rps": round(len(lat) / wall), "n": len(lat), "errors": errors}
    if swarm is not None and lat:
        out["cpu_ms_per_answer"] = per_answer(before, cpu_seconds(swarm.pids), len(lat))
    return out


async def burst(url: str, headers: dict[str, str], n: int) -> dict[str, Any]:
    """``n`` requests sent at once, each on its own connection."""
    import aiohttp

    payload = json.dumps(body(False)).encode()
    hdrs = {**headers, "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=n, limit_per_host=n)
    errors: list[str] = []
    lat: list[float] = []
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=120)) as http:
        async def one() -> None:
            t0 = time.perf_counter()
            try:
                async with http.post(url, data=payload, headers=hdrs) as r:
                    await r.read()
                    if r.status != 200:
                        errors.append(str(r.status))
                        return
            except (TimeoutError, aiohttp.ClientError) as exc:
                errors.append(type(exc).__name__)
                return
            lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
    return {"ok": len(lat), "errors": len(errors), "error_kinds": sorted(set(errors))[:5],
            "wall_s": round(time.perf_counter() - t0, 2),
            "p50_ms": round(median(lat) * 1e3, 1), "p99_ms": round(pct(lat, 0.99) * 1e3, 1)}


# -- the same requests over libp2p, from the SDK -----------------------------------------
def run_p2p_load(spec_path: str) -> None:
    """Child process: a client of the hub over libp2p (Noise, yamux, msgpack
    RPC: ``Client(bootstrap=...)``, as a Python program using the SDK
    would), with the same API key. It runs each cell the parent asks for on
    standard input (one JSON line: ``c``, ``seconds``, ``warmup``) as
    :func:`cell` does over HTTP: closed loop, whole answers of the same
    prompt and length, the swarm's CPU per answer (this process as the load
    generator); one JSON line back on standard output."""
    import trio

    from p2pinfer.client import Client
    from p2pinfer.errors import P2PInferError

    spec = json.loads(Path(spec_path).read_text())
    pids = spec["pids"]

    async def one_cell(client: Client, c: int, seconds: float, warmup: float
                       ) -> dict[str, Any]:
        lat: list[float] = []
        errors = 0
        before: dict[str, float] = {}
        start = time.perf_counter()
        measure_from = start + warmup
        stop_at = measure_from + seconds

        async def loop() -> None:
            nonlocal errors
            while (t0 := time.perf_counter()) < stop_at:
                try:
                    await client.inference("benchmark prompt", model="mock",
                                           max_tokens=TOKENS)
                    ok = True
                except P2PInferError:
                    ok = False
                if t0 >= measure_from:
                    if ok:
                        lat.append(time.perf_counter() - t0)
                    else:
                        errors += 1

        async with trio.open_nursery() as nursery:
            for _ in range(c):
                nursery.start_soon(loop)
            await trio.sleep(warmup)
            before.update(cpu_seconds(pids))
        wall = time.perf_counter() - measure_from
        out: dict[str, Any] = {
            "p50_ms": round(median(lat) * 1e3, 3), "p99_ms": round(pct(lat, 0.99) * 1e3, 3),
            "rps": round(len(lat) / wall), "n": len(lat), "errors": errors}
        if lat:
            out["cpu_ms_per_answer"] = per_answer(before, cpu_seconds(pids), len(lat))
        return out

    async def main() -> None:
        async with Client(bootstrap=[spec["addr"]], api_key=spec["key"]) as client:
            with trio.fail_after(60):
                await client.wait_for_model("mock")
            await client.inference("benchmark prompt", model="mock", max_tokens=TOKENS)
            print(json.dumps({"ready": True}), flush=True)
            while line := await trio.to_thread.run_sync(sys.stdin.readline):
                ask = json.loads(line)
                result = await one_cell(client, ask["c"], ask["seconds"], ask["warmup"])
                print(json.dumps(result), flush=True)

    trio.run(main)


class P2PLoad:
    """The parent's handle on :func:`run_p2p_load` (a process of its own:
    the SDK runs on trio, this process's generator on asyncio)."""

    def __init__(self, swarm: Swarm, key: str, cpus: set[int]) -> None:
        spec = swarm.base / "p2p-load.json"
        spec.write_text(json.dumps({"addr": swarm.addrs["hub"], "key": key,
                                    "pids": swarm.pids}))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--p2p-load", str(spec)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=open(swarm.base / "p2p-load.log", "wb"),
            preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        swarm.procs.append(self.proc)
        self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the libp2p load generator ended: {self.proc.wait()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def cell(self, concurrency: int, seconds: float, warmup: float = 0.3
                   ) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"c": concurrency, "seconds": seconds,
                                          "warmup": warmup}).encode() + b"\n")
        self.proc.stdin.flush()
        return await asyncio.to_thread(self._read)


def profile(swarm: Swarm, out: Path, seconds: float) -> list[subprocess.Popen[bytes]]:
    """py-spy on the hub, each of its front doors and the worker for the
    next ``seconds`` (raw stacks, one file each in ``out``)."""
    import psutil  # type: ignore[import-untyped]

    out.mkdir(parents=True, exist_ok=True)
    spy = str(Path(sys.executable).with_name("py-spy"))
    targets = [("hub", swarm.hub.pid), ("worker", swarm.worker.pid)]
    targets += [(f"front_door_{i}", child.pid) for i, child in
                enumerate(psutil.Process(swarm.hub.pid).children(recursive=True))]
    return [subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(int(seconds)),
                              "-r", "250", "-f", "raw", "--nonblocking",
                              "-o", str(out / f"{name}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in targets]


def core_figures(cpu: dict[str, float], rps: float) -> dict[str, Any]:
    """Where the one-core c64 cell is bound, from its CPU per answer.

    ``core_busy_c64_1core``: the share of each core used (the front door's:
    hub and front doors; the other: worker, mock and load generator); the
    busier one is the limit. ``scaling_2core_bound``: the most two cores can
    serve over one, ``2 * max(F, R) / (F + R)`` with F and R the CPU per
    answer on either side: on two cores everything shares both, so the
    ratio reaches 1.4 only where the front door's side costs at least 2.33
    times the rest."""
    front = cpu["hub"] + cpu["front_doors"]
    rest = cpu["worker"] + cpu["mock"] + cpu["load_generator"]
    return {"core_busy_c64_1core": {"front_door": round(front * rps / 1e3, 2),
                                    "other": round(rest * rps / 1e3, 2)},
            "scaling_2core_bound": round(2 * max(front, rest) / (front + rest), 2)}


async def measure(swarm: Swarm, key: str, cpus: list[int], seconds: float,
                  out: dict[str, Any], profile_dir: str | None = None) -> None:
    door = f"http://127.0.0.1:{swarm.web_port}/v1/chat/completions"
    mock = f"{swarm.mock_url}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {key}"}
    cells: list[dict[str, Any]] = []
    direct: dict[tuple[bool, int], dict[str, Any]] = {}
    layouts = [("1core", {cpus[0]}, {cpus[1]} if len(cpus) > 1 else {cpus[0]})]
    if len(cpus) > 1:
        layouts.append(("2core", set(cpus), set(cpus)))
    p2p = P2PLoad(swarm, key, layouts[0][2])
    for label, hub_cpus, rest in layouts:
        pin(swarm.hub.pid, hub_cpus)
        for proc in (swarm.worker, swarm.mock, p2p.proc):
            pin(proc.pid, rest)
        os.sched_setaffinity(0, rest)
        await cell(door, auth, False, 16, 0.5)  # settle after the move
        for stream in (False, True):
            mode = "streamed" if stream else "whole"
            for c in CONCURRENCY:
                if label == "1core":  # the mock's own figures, same generator
                    d = direct[(stream, c)] = await cell(mock, {}, stream, c, seconds)
                    cells.append({"target": "mock", "mode": mode, "c": c, **d})
                spies = (profile(swarm, Path(profile_dir), seconds)
                         if profile_dir and label == "1core" and not stream and c == 64
                         else [])
                f = await cell(door, auth, stream, c, seconds,
                               swarm=swarm if c == 64 else None)
                for spy in spies:
                    spy.wait(timeout=30)
                cells.append({"target": f"front_door_{label}", "mode": mode, "c": c, **f})
                d = direct[(stream, c)]
                if not stream and c == 64:
                    out[f"rps_c64_{label}"] = f["rps"]
                    out[f"overhead_p99_ms_c64_{label}"] = round(f["p99_ms"] - d["p99_ms"], 3)
                    out[f"cpu_ms_per_answer_c64_{label}"] = f.get("cpu_ms_per_answer")
                    if label == "1core" and f.get("cpu_ms_per_answer"):
                        out.update(core_figures(f["cpu_ms_per_answer"], f["rps"]))
                if not stream and c == 1 and label == "1core":
                    out["overhead_p50_ms_c1"] = round(f["p50_ms"] - d["p50_ms"], 3)
                if stream and c == 64:
                    out[f"streamed_overhead_p99_ms_c64_{label}"] = round(
                        f["p99_ms"] - d["p99_ms"], 3)
        # The same whole answers over libp2p from the SDK, in the same layout.
        for c in (1, 64) if label == "1core" else (64,):
            f = await p2p.cell(c, seconds)
            cells.append({"target": f"p2p_{label}", "mode": "whole", "c": c, **f})
            d = direct[(False, c)]
            if c == 1:
                out["p2p_overhead_p50_ms_c1"] = round(f["p50_ms"] - d["p50_ms"], 3)
            else:
                out[f"p2p_rps_c64_{label}"] = f["rps"]
                out[f"p2p_overhead_p99_ms_c64_{label}"] = round(f["p99_ms"] - d["p99_ms"], 3)
                out[f"p2p_cpu_ms_per_answer_c64_{label}"] = f.get("cpu_ms_per_answer")
        if label == "2core":
            b = await burst(door, auth, 1000)
            out["c1000_errors"] = b["errors"]
            out["c1000"] = b
    if "rps_c64_2core" in out and out.get("rps_c64_1core"):
        out["scaling_2core_over_1core"] = round(out["rps_c64_2core"] / out["rps_c64_1core"], 2)
    out["http_over_p2p"] = {
        f"rps_c64_{label}": round(out[f"rps_c64_{label}"] / out[f"p2p_rps_c64_{label}"], 2)
        for label, _, _ in layouts if out.get(f"p2p_rps_c64_{label}")}
    http_cpu = out.get("cpu_ms_per_answer_c64_1core") or {}
    p2p_cpu = out.get("p2p_cpu_ms_per_answer_c64_1core") or {}
    if http_cpu.get("hub") and p2p_cpu.get("hub"):
        out["hub_cpu_ms_per_answer_c64_1core"] = {"http": http_cpu["hub"],
                                                  "p2p": p2p_cpu["hub"]}
    out["cells"] = cells


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="about a minute")
    ap.add_argument("--backend", choices=("openai", "synthetic"), default="openai",
                    help="the worker's model: OpenAI-compatible on the mock, or synthetic")
    ap.add_argument("--workers", type=int, default=2,
                    help="[web] workers: front-door processes (0: inside the node)")
    ap.add_argument("--profile", metavar="DIR",
                    help="py-spy (raw stacks) of every process during the one-core "
                         "c64 whole-answer cell, into DIR")
    ap.add_argument("--mock", help=argparse.SUPPRESS)
    ap.add_argument("--p2p-load", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mock:
        run_mock(args.mock)
        return
    if args.p2p_load:
        run_p2p_load(args.p2p_load)
        return
    seconds = 1.0 if args.quick else 5.0
    cpus = sorted(os.sched_getaffinity(0))
    out: dict[str, Any] = {"machine": machine(), "quick": args.quick, "backend": args.backend,
                           "workers": args.workers,
                           "seconds_per_cell": seconds, "tokens": TOKENS}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        swarm = Swarm(Path(tmp), args.backend, {cpus[0]},
                      {cpus[-1]} if len(cpus) > 1 else {cpus[0]}, args.workers)
        try:
            base_url = f"http://127.0.0.1:{swarm.web_port}"

            async def run() -> None:
                key = await account(base_url)
                await wait_ready(base_url, key)
                await measure(swarm, key, cpus, seconds, out, args.profile)

            asyncio.run(run())
        finally:
            swarm.stop()
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
