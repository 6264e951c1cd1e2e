"""Which HTTP server for the front door: ASGI servers side by side.

Each server runs one small app in its own process pinned to the first CPU;
the load generator (aiohttp's client, closed loop) runs here on the second.
The app answers ``POST /v1/chat/completions`` with a fixed JSON body after
reading the request's JSON, as a Starlette route behind one pure ASGI
middleware (``--app starlette``, the shape of the web role), or as a bare
ASGI callable (``--app bare``: the server's own cost). Prints ONE JSON
object: req/s, p50 and p99 per server and concurrency.

    hypercorn-trio     Hypercorn's trio worker (h11): the web role today
    hypercorn-uvloop   Hypercorn's asyncio worker on uvloop (h11)
    uvicorn            uvicorn on uvloop with httptools (C parser)
    granian            granian's ASGI interface (Rust, hyper), one worker

Usage: python benchmarks/compare_http_servers.py [--seconds 3] [--app starlette|bare]
(needs aiohttp, uvicorn[standard], granian: pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, median, pct  # noqa: E402

ANSWER = json.dumps({"id": "x", "object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "tok " * 16},
     "finish_reason": "stop"}], "usage": {"prompt_tokens": 8, "completion_tokens": 16,
                                          "total_tokens": 24}}).encode()


def bare_app() -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        json.loads(body)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": ANSWER})
    return app


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def chat(request: Request) -> Response:
        await request.json()
        return Response(ANSWER, media_type="application/json")

    inner = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])

    async def headers(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def send_with(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (b"x-content-type-options", b"nosniff")]
            await send(message)
        await inner(scope, receive, send_with)
    return headers


def serve(server: str, app_kind: str, port: int) -> None:
    app = bare_app() if app_kind == "bare" else starlette_app()
    if server.startswith("hypercorn"):
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.accesslog = None
        config.backlog = 2048
        if server == "hypercorn-trio":
            import trio
            from hypercorn.trio import serve as trio_serve

            trio.run(trio_serve, app, config)
        else:
            import uvloop
            from hypercorn.asyncio import serve as aio_serve

            uvloop.run(aio_serve(app, config))
    elif server == "uvicorn":
        import uvicorn

        uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                    log_level="error", access_log=False, backlog=2048)
    elif server == "granian":
        from granian.constants import Interfaces, Loops
        from granian.server import Server

        # granian imports the app by name: this module is importable as
        # compare_http_servers from the benchmarks directory
        target = "compare_http_servers:BARE" if app_kind == "bare" \
            else "compare_http_servers:STARLETTE"
        Server(target, address="127.0.0.1", port=port, interface=Interfaces.ASGI,
               workers=1, loop=Loops.uvloop, log_enabled=False, backlog=2048).serve()
    else:
        raise SystemExit(f"unknown server {server}")


BARE = bare_app()
STARLETTE = starlette_app()


async def load(url: str, concurrency: int, seconds: float) -> dict[str, Any]:
    import aiohttp

    payload = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    lat: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        warm_until = time.perf_counter() + 0.5
        stop_at = warm_until + seconds

        async def loop() -> None:
            nonlocal errors
            while (t0 := time.perf_counter()) < stop_at:
                try:
                    async with http.post(url, data=payload,
                                         headers={"Content-Type": "application/json"}) as r:
                        await r.read()
                        ok = r.status == 200
                except aiohttp.ClientError:
                    ok = False
                if t0 >= warm_until:
                    if ok:
                        lat.append(time.perf_counter() - t0)
                    else:
                        errors += 1

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return {"rps": round(len(lat) / seconds), "p50_ms": round(median(lat) * 1e3, 3),
            "p99_ms": round(pct(lat, 0.99) * 1e3, 3), "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--app", choices=("starlette", "bare"), default="starlette")
    ap.add_argument("--servers", default="hypercorn-trio,hypercorn-uvloop,uvicorn,granian")
    ap.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], args.app, int(args.serve[1]))
        return
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, load_cpu = {cpus[0]}, {cpus[-1]}
    os.sched_setaffinity(0, load_cpu)
    out: dict[str, Any] = {"machine": machine(), "app": args.app, "seconds": args.seconds,
                           "servers": {}}
    for i, server in enumerate(args.servers.split(",")):
        port = 18700 + i
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--app", args.app, "--serve", server,
             str(port)], cwd=os.path.dirname(os.path.abspath(__file__)),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=lambda: os.sched_setaffinity(0, server_cpu))
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            deadline = time.monotonic() + 30
            while True:
                probe = asyncio.run(load(url, 1, 0.1))
                if probe["errors"] == 0 and probe["rps"] > 0:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    assert proc.stderr is not None
                    raise RuntimeError(proc.stderr.read().decode()[-2000:])
                time.sleep(0.2)
            out["servers"][server] = {str(c): asyncio.run(load(url, c, args.seconds))
                                      for c in (1, 64)}
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
