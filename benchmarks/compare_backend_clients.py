"""What a worker's HTTP client costs per answer from an OpenAI-compatible
server, on trio: httpx's client (``client.stream``), httpx's transport
driven directly, httpx2's transport driven directly on one pool and on
lanes of one connection (what the worker's backends do), httpcore (the
layer under httpx) driven directly, and
(streamed only) the worker's OpenAI-compatible backend itself
(``backend``: request body, events decoded into chunks).

The server is bench_http.py's instant mock (aiohttp, its own process, 16
tokens). This process sends ``--n`` requests, ``--concurrency`` in flight,
streamed (server-sent events, read line by line) or whole (``--whole``),
and prints ONE JSON object: CPU milliseconds of this process per answer
for each client, in alternating rounds (``--rounds`` each), and the
machine. With an instant server, that CPU is the client's own cost: what
the worker spends per answer before the model does anything.

Usage: python benchmarks/compare_backend_clients.py [--n 2000] [--rounds 2] [--whole]
[--concurrency 8]
(needs aiohttp for the mock: pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, median  # noqa: E402

HERE = Path(__file__).resolve().parent


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def timed(one: Callable[[], Awaitable[None]], n: int, concurrency: int) -> float:
    """CPU ms of this process per call of ``one`` (after a warm-up)."""
    for _ in range(50):
        await one()
    per_task = n // concurrency
    start = cpu_seconds()

    async def loop() -> None:
        for _ in range(per_task):
            await one()

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(loop)
    return (cpu_seconds() - start) * 1e3 / (per_task * concurrency)


async def with_httpx(base: str, body: dict[str, Any], n: int, concurrency: int) -> float:
    import httpx

    async with httpx.AsyncClient(base_url=base + "/",
                                 timeout=httpx.Timeout(60.0, connect=5.0)) as client:
        async def one() -> None:
            async with client.stream("POST", "v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                async for _ in response.aiter_lines():
                    pass

        return await timed(one, n, concurrency)


async def with_transport(module: str, base: str, body: dict[str, Any], n: int,
                         concurrency: int, *, lanes: bool = False) -> float:
    """The transport of ``module`` (httpx or httpx2, which share their API)
    driven directly: its request and response types and error mapping,
    without the client's per-request machinery (the worker's backends did
    this on httpx's one pool until 2026-12-07). With ``lanes``, each request
    on a client of one connection lent by
    :class:`p2pinfer.inference.remote.ClientLanes`, as the worker's backends
    do since: one pool looks over all its connections on each request."""
    import importlib

    http: Any = importlib.import_module(module)
    data = json.dumps(body).encode()
    url = http.URL(base + "/v1/chat/completions")
    headers = {"content-type": "application/json"}
    timeouts = {"connect": 5.0, "read": 60.0, "write": 60.0, "pool": 60.0}

    async def send(transport: Any) -> None:
        request = http.Request("POST", url, headers=headers, content=data,
                               extensions={"timeout": timeouts})
        response = await transport.handle_async_request(request)
        try:
            assert response.status_code == 200
            pending = b""
            async for chunk in response.aiter_raw():
                *_, pending = (pending + chunk).split(b"\n")
        finally:
            await response.aclose()

    if not lanes:
        async with http.AsyncHTTPTransport() as transport:
            return await timed(lambda: send(transport), n, concurrency)

    from p2pinfer.inference.remote import ONE_CONNECTION, ClientLanes

    tls = http.create_ssl_context()
    pool = ClientLanes(lambda: http.AsyncClient(verify=tls, limits=ONE_CONNECTION))

    async def one() -> None:
        lane = pool.take()
        try:
            await send(lane.client._transport_for_url(url))
        finally:
            pool.give(lane)

    try:
        return await timed(one, n, concurrency)
    finally:
        await pool.aclose()


async def with_backend(base: str, body: dict[str, Any], n: int, concurrency: int) -> float:
    """The worker's OpenAI-compatible backend as the engine drives it: the
    request body built, the answer's events decoded into chunks."""
    from p2pinfer.inference.backend import GenerationParams, GenerationRequest
    from p2pinfer.inference.openai import OpenAIBackend
    from p2pinfer.prompts import Message

    backend = OpenAIBackend("mock", base_url=base + "/v1", remote_model="mock",
                            slots=concurrency)
    request = GenerationRequest((Message("user", body["messages"][0]["content"]),),
                                GenerationParams(max_tokens=body["max_tokens"]))
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)

        async def one() -> None:
            async for _ in backend.generate(request):
                pass

        try:
            return await timed(one, n, concurrency)
        finally:
            nursery.cancel_scope.cancel()


async def with_httpcore(base: str, body: dict[str, Any], n: int, concurrency: int) -> float:
    import httpcore

    data = json.dumps(body).encode()
    headers = [(b"host", base.split("//", 1)[1].encode()),
               (b"content-type", b"application/json"),
               (b"content-length", str(len(data)).encode())]
    timeouts = {"connect": 5.0, "read": 60.0, "write": 60.0, "pool": 60.0}
    async with httpcore.AsyncConnectionPool(max_connections=concurrency) as pool:
        async def one() -> None:
            async with pool.stream("POST", f"{base}/v1/chat/completions", headers=headers,
                                   content=data, extensions={"timeout": timeouts}) as response:
                assert response.status == 200
                pending = b""
                async for chunk in response.aiter_stream():
                    *_, pending = (pending + chunk).split(b"\n")

        return await timed(one, n, concurrency)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000, help="requests per round")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--whole", action="store_true", help="whole answers, not streamed")
    args = ap.parse_args()
    body = {"model": "mock", "messages": [{"role": "user", "content": "benchmark prompt"}],
            "max_tokens": 16, "stream": not args.whole}
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        mock = subprocess.Popen([sys.executable, str(HERE / "bench_http.py"), "--mock",
                                 str(port_file)])
        try:
            deadline = time.monotonic() + 30
            while not port_file.exists():
                if mock.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the mock did not start")
                time.sleep(0.05)
            base = f"http://127.0.0.1:{port_file.read_text()}"
            figures: dict[str, list[float]] = {"httpx": [], "httpx_transport": [],
                                               "httpx2_transport": [], "httpx2_lanes": [],
                                               "httpcore": [], "backend": []}
            for _ in range(args.rounds):
                figures["httpx"].append(trio.run(with_httpx, base, body, args.n,
                                                 args.concurrency))
                for module in ("httpx", "httpx2"):
                    figures[f"{module}_transport"].append(trio.run(
                        with_transport, module, base, body, args.n, args.concurrency))
                figures["httpx2_lanes"].append(trio.run(functools.partial(
                    with_transport, "httpx2", base, body, args.n, args.concurrency,
                    lanes=True)))
                figures["httpcore"].append(trio.run(with_httpcore, base, body, args.n,
                                                    args.concurrency))
                if not args.whole:  # the backend always streams from the server
                    figures["backend"].append(trio.run(with_backend, base, body, args.n,
                                                       args.concurrency))
        finally:
            mock.kill()
            mock.wait()
    print(json.dumps({
        "machine": machine(), "n": args.n, "concurrency": args.concurrency,
        "streamed": not args.whole,
        "cpu_ms_per_answer": {k: round(median(v), 3) for k, v in figures.items() if v},
        "rounds": {k: [round(x, 3) for x in v] for k, v in figures.items() if v},
    }))


if __name__ == "__main__":
    main()
