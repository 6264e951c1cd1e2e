"""The web app's own cost per request: microseconds of CPU per request
through its whole ASGI stack (client address, request metrics, security
headers, body limit, routing, the dialect's handler and response), called
in-process on uvloop, with an upstream that answers at once.

No HTTP server, no socket, no swarm: this is the part of a front door's
(or the in-node web role's) time that the app itself adds, the part the
HTTP server and the calls to the node come on top of (bench_http.py
measures the whole path). The upstream is :class:`InstantUpstream`: the
model list, and an answer of ``TOKENS`` chunks (or one whole chunk when
the route asks for a whole answer), returned from memory.

Prints ONE JSON object: ``us_per_request`` for each route (the median of
``--rounds`` rounds of ``--n`` requests each) and the machine.

Usage: python benchmarks/bench_web_app.py [--n 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, median  # noqa: E402

TOKENS = 16
KEY = "p2p_aaaaaaaaaaaa_" + "b" * 43


class _Stream:
    """What an InferenceCall reads: chunks, then the trailer."""

    def __init__(self, chunks: list[dict[str, Any]]) -> None:
        self.chunks = chunks
        self.trailer = {"model": "mock", "finish_reason": "stop", "request_id": "r1",
                        "usage": {"prompt_tokens": 3, "completion_tokens": TOKENS,
                                  "total_tokens": TOKENS + 3}}

    async def __anext__(self) -> dict[str, Any]:
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)

    async def __aexit__(self, *exc: Any) -> None:
        return None


class InstantUpstream:
    """A WebUpstream answering from memory (only what these routes use)."""

    def __init__(self) -> None:
        from p2pinfer.web.upstream import ModelCatalog

        self.catalog = ModelCatalog(self, 60.0)  # type: ignore[arg-type]

    async def authenticate(self, auth: dict[str, str]) -> None:
        return None

    async def call(self, role: str, method: str, params: Any = None, *,
                   long: bool = False) -> Any:
        return {"models": [{"name": "mock", "capabilities": ["chat", "complete"]}]}

    async def inference(self, request: dict[str, Any], auth: dict[str, str], *,
                        stream: bool = True) -> Any:
        from p2pinfer.web.upstream import InferenceCall

        if stream:
            chunks = [{"delta": "tok "} for _ in range(TOKENS)]
        else:
            chunks = [{"delta": "tok " * TOKENS}]
        return InferenceCall(_Stream(chunks[1:]), chunks[0], "gateway")


class _Counts:
    def count_request(self, service: str, method: str, status: str, n: int = 1) -> None:
        return None


MESSAGES = [{"role": "user", "content": "benchmark prompt"}]
ROUTES: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "openai_chat_whole": ("POST", "/v1/chat/completions",
                          {"model": "mock", "messages": MESSAGES, "max_tokens": TOKENS}),
    "openai_chat_streamed": ("POST", "/v1/chat/completions",
                             {"model": "mock", "messages": MESSAGES, "max_tokens": TOKENS,
                              "stream": True}),
    "ollama_chat_whole": ("POST", "/api/chat",
                          {"model": "mock", "messages": MESSAGES, "stream": False}),
    "rest_inference_whole": ("POST", "/api/inference",
                             {"model": "mock", "prompt": "benchmark prompt",
                              "stream": False}),
    "openai_models": ("GET", "/v1/models", None),
}


async def timed(app: Any, method: str, path: str, payload: dict[str, Any] | None,
                n: int) -> float:
    """Seconds per request over ``n`` requests (each checked to succeed)."""
    body = json.dumps(payload).encode() if payload is not None else b""
    headers = [(b"host", b"127.0.0.1:8000"), (b"authorization", f"Bearer {KEY}".encode()),
               (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if delivered:  # the body is in: what follows is the client going away
            import asyncio

            await asyncio.Event().wait()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    t0 = time.perf_counter()
    for _ in range(n):
        sent.clear()
        delivered = False
        await app(dict(scope), receive, send)
        if sent[0].get("status") != 200:
            raise RuntimeError(f"{method} {path}: {sent[0]} {sent[1:2]}")
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000, help="requests per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    import uvloop

    from p2pinfer.config import NodeConfig
    from p2pinfer.web.settings import WebSettings
    from p2pinfer.web.site import WebSite

    site = WebSite(WebSettings.from_config(NodeConfig.from_mapping({}, env={})),
                   InstantUpstream(),  # type: ignore[arg-type]
                   peer_id="12D3KooWbenchmark", metrics=_Counts(), csrf_key=b"k" * 32,
                   tls=False)
    out: dict[str, Any] = {"machine": machine(), "n": args.n, "rounds": args.rounds,
                           "tokens": TOKENS}

    async def run() -> None:
        result: dict[str, float] = {}
        for name, (method, path, payload) in ROUTES.items():
            await timed(site.app, method, path, payload, max(args.n // 10, 50))  # warm up
            rounds = [await timed(site.app, method, path, payload, args.n)
                      for _ in range(args.rounds)]
            result[name] = round(median(rounds) * 1e6, 1)
        out["us_per_request"] = result

    uvloop.run(run())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
