"""Benchmark of the inference role: llama.cpp called directly versus the same
requests through the role over RPC between two real libp2p hosts, in one run.

Prints one JSON object:

- ``direct_tok_s``: llama-cpp-python's own ``create_chat_completion(stream=True)``
  on a ``Llama`` configured like one of the role's slots, in the main thread;
  completion tokens over end-to-end time, summed over the requests.
- ``worker_tok_s``: the same prompts through ``processPrompt`` from a client
  host to a worker host (RPC over Noise + yamux on loopback), timed by the
  client; ``tok_s_ratio`` = worker / direct.
- ``ttft_overhead_ms``: time to first token through the worker minus direct,
  the median over short requests (2 tokens) sent to both paths in pairs.
- ``agg_tok_s``: aggregate completion tokens/s through the worker with 1, 2
  and 4 clients sending requests at once.
- ``cache_hit_ms``: median end-to-end latency of a cached (temperature 0)
  answer through the worker.
- ``layouts`` (full run only): aggregate tokens/s of the engine alone for each
  slots x n_threads layout at 1 and 2 concurrent requests.

Every request uses temperature 0 and ``cache: false`` (except the cache
measurement) with distinct prompts, so no answer comes from the cache and
the direct and worker paths produce the same text (checked: ``same_text``).

    .venv/bin/python benchmarks/bench_inference.py --quick   # under 60 s
    .venv/bin/python benchmarks/bench_inference.py           # adds the layout sweep
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from types import SimpleNamespace
from typing import Any

import trio

TOPICS = ["a robot who paints", "a lighthouse keeper", "a lost city", "a dragon who cooks",
          "a time traveller", "a river spirit", "a clockmaker", "a desert caravan",
          "a snow leopard", "a sailing ship", "a library at night", "a mountain village"]


def prompt_for(i: int) -> str:
    return f"Write a long story about {TOPICS[i % len(TOPICS)]}."


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import llama_cpp

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


# -- direct -----------------------------------------------------------------------------------
def direct_run(llm: Any, prompt: str, max_tokens: int) -> dict[str, Any]:
    """llama-cpp-python on its own: one streamed chat completion."""
    started = time.perf_counter()
    first = None
    parts = []
    for chunk in llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0.0, stream=True):
        text = chunk["choices"][0]["delta"].get("content")
        if text:
            if first is None:
                first = time.perf_counter()
            parts.append(text)
    ended = time.perf_counter()
    return {"text": "".join(parts), "tokens": len(parts), "ttft": (first or ended) - started,
            "seconds": ended - started}


# -- through the role ----------------------------------------------------------------------------
@asynccontextmanager
async def worker(tables: dict[str, Any]) -> AsyncIterator[tuple[Any, Any, str]]:
    """The inference role on one host; an RPC client on another."""
    import multiaddr
    from prometheus_client import CollectorRegistry

    from p2pinfer.config import NodeConfig
    from p2pinfer.identity import Identity
    from p2pinfer.inference import InferenceRole
    from p2pinfer.rpc import RPC_PROTOCOL, RpcClient, RpcServer, make_host
    from p2pinfer.rpc.host import guard_handler

    config = NodeConfig.from_mapping({"node": {"home": "/tmp/bench-unused"}, **tables}, env={})
    role = InferenceRole(SimpleNamespace(config=config, registry=CollectorRegistry()))
    server = RpcServer(is_member=lambda peer: True)
    server.register(role)
    loopback = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    server_host, client_host = make_host(Identity.generate()), make_host(Identity.generate())
    async with server_host.run(listen_addrs=loopback), client_host.run(listen_addrs=loopback):
        server_host.set_stream_handler(RPC_PROTOCOL, guard_handler("rpc", server.handle_stream))
        async with trio.open_nursery() as nursery:
            await nursery.start(role.run)
            states = await role.engine.wait_settled()
            if set(states.values()) != {"loaded"}:
                raise SystemExit(f"models failed to load: {states}")
            async with RpcClient.open(client_host) as client:
                peer = await client.connect(str(server_host.get_addrs()[0]))
                yield role, client, peer
            nursery.cancel_scope.cancel()


async def worker_run(client: Any, peer: str, prompt: str, max_tokens: int,
                     cache: bool = False) -> dict[str, Any]:
    started = trio.current_time()
    first = None
    parts = []
    async with client.stream(peer, "processPrompt", {
            "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "cache": cache}) as stream:
        async for chunk in stream:
            if first is None:
                first = trio.current_time()
            parts.append(chunk["delta"])
    ended = trio.current_time()
    return {"text": "".join(parts), "tokens": stream.trailer["usage"]["completion_tokens"],
            "ttft": (first or ended) - started, "seconds": ended - started,
            "cached": stream.trailer["cached"]}


async def aggregate(run_one: Any, concurrency: int, per_client: int, offset: int) -> float:
    """Completion tokens/s with ``concurrency`` clients, each sending
    ``per_client`` requests one after the other."""
    tokens = 0

    async def client_loop(c: int) -> None:
        nonlocal tokens
        for k in range(per_client):
            result = await run_one(prompt_for(offset + c * per_client + k))
            tokens += result["tokens"]

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for c in range(concurrency):
            nursery.start_soon(client_loop, c)
    return tokens / (trio.current_time() - started)


async def engine_layouts(max_tokens: int) -> dict[str, Any]:
    """Aggregate tokens/s of the engine alone for each slots x n_threads layout."""
    from p2pinfer.inference import (
        InferenceEngine,
        LlamaCppBackend,
        LlamaCppOptions,
        TextChunk,
        embedded_model_path,
        parse_prompt_params,
    )

    out: dict[str, Any] = {}
    for slots, threads in ((1, 1), (1, 2), (2, 1), (2, 2)):
        engine = InferenceEngine()
        engine.add_model(LlamaCppBackend("m", LlamaCppOptions(
            path=embedded_model_path(), slots=slots, n_threads=threads)))

        async def run_one(prompt: str, engine: Any = engine) -> dict[str, Any]:
            n = 0
            request = parse_prompt_params({"prompt": prompt, "max_tokens": max_tokens,
                                           "temperature": 0, "cache": False})
            async with aclosing(engine.generate(request)) as events:
                async for event in events:
                    if not isinstance(event, TextChunk):
                        n = event.completion_tokens
            return {"tokens": n}

        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            await engine.wait_settled()
            await run_one(prompt_for(0))  # warm-up
            c1 = await aggregate(run_one, 1, 2, 1)
            c2 = await aggregate(run_one, 2, 2, 3)
            nursery.cancel_scope.cancel()
        key = f"slots={slots},n_threads={threads}"
        out[key] = {"1": round(c1, 1), "2": round(c2, 1)}
        print(f"layout {key}: {out[key]}", file=sys.stderr)
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from llama_cpp import Llama

    from p2pinfer.inference import embedded_model_path

    info = machine()
    max_tokens = args.max_tokens
    n = args.requests
    slots, threads = 2, 1
    llm = Llama(model_path=str(embedded_model_path()), n_ctx=2048, n_threads=threads,
                n_threads_batch=threads, seed=42, verbose=False)
    tables = {"inference": {"slots": slots, "n_threads": threads, "max_queue": 1000}}
    result: dict[str, Any] = {"machine": info, "config": {
        "model": "SmolLM2-135M-Instruct Q4_1", "slots": slots, "n_threads": threads,
        "max_tokens": max_tokens, "requests": n, "quick": args.quick}}
    async with worker(tables) as (role, client, peer):
        # Warm both paths (first prompt evaluation, first stream).
        direct_run(llm, prompt_for(100), max_tokens)
        await worker_run(client, peer, prompt_for(100), max_tokens)
        direct, through = [], []
        for i in range(n):  # interleaved, so machine noise hits both alike
            direct.append(direct_run(llm, prompt_for(i), max_tokens))
            through.append(await worker_run(client, peer, prompt_for(i), max_tokens))
            print(f"request {i}: direct {direct[-1]['tokens']} tok {direct[-1]['seconds']:.2f}s"
                  f", worker {through[-1]['tokens']} tok {through[-1]['seconds']:.2f}s",
                  file=sys.stderr)
        direct_tok_s = sum(r["tokens"] for r in direct) / sum(r["seconds"] for r in direct)
        worker_tok_s = sum(r["tokens"] for r in through) / sum(r["seconds"] for r in through)

        # Time to first token: many short requests, each prompt on both paths
        # back to back; the overhead is the median of the paired differences.
        pairs = []
        for i in range(args.ttft_requests):
            d = direct_run(llm, prompt_for(400 + i), 2)
            w = await worker_run(client, peer, prompt_for(400 + i), 2)
            pairs.append((d["ttft"], w["ttft"]))
        direct_ttft = statistics.median(d for d, _ in pairs)
        worker_ttft = statistics.median(w for _, w in pairs)
        ttft_overhead = statistics.median(w - d for d, w in pairs)

        async def run_one(prompt: str) -> dict[str, Any]:
            return await worker_run(client, peer, prompt, max_tokens)

        per = {1: 3, 2: 3, 4: 2} if args.quick else {1: 4, 2: 4, 4: 3}
        agg = {}
        for concurrency in (1, 2, 4):
            agg[str(concurrency)] = round(
                await aggregate(run_one, concurrency, per[concurrency], 200 + 20 * concurrency),
                1)
            print(f"concurrency {concurrency}: {agg[str(concurrency)]} tok/s", file=sys.stderr)

        await worker_run(client, peer, prompt_for(300), max_tokens, cache=True)
        hits = [await worker_run(client, peer, prompt_for(300), max_tokens, cache=True)
                for _ in range(30)]
        assert all(h["cached"] for h in hits)
        status = role.engine.status("smollm2")

    result.update({
        "direct_tok_s": round(direct_tok_s, 1),
        "worker_tok_s": round(worker_tok_s, 1),
        "tok_s_ratio": round(worker_tok_s / direct_tok_s, 3),
        "direct_ttft_ms": round(direct_ttft * 1000, 1),
        "worker_ttft_ms": round(worker_ttft * 1000, 1),
        "ttft_overhead_ms": round(ttft_overhead * 1000, 1),
        "agg_tok_s": agg,
        "cache_hit_ms": round(statistics.median(h["seconds"] for h in hits) * 1000, 2),
        "same_text": all(d["text"] == w["text"] for d, w in zip(direct, through, strict=True)),
        "tokens_per_request": round(statistics.mean(r["tokens"] for r in through), 1),
        "worker_status": {k: status[k] for k in ("tok_s", "ttft_ms", "requests")},
    })
    llm.close()
    if not args.quick:
        result["layouts"] = await engine_layouts(max_tokens)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["goals"] = {
        "tok_s_ratio>=0.95": result["tok_s_ratio"] >= 0.95,
        "ttft_overhead_ms<10": result["ttft_overhead_ms"] < 10,
        "agg2>=agg1": agg["2"] >= agg["1"],
    }
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a run under 60 s")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--requests", type=int, default=None,
                        help="requests on each path for the direct/worker comparison")
    parser.add_argument("--ttft-requests", type=int, default=None,
                        help="short requests on each path for the time to first token")
    ns = parser.parse_args()
    if ns.max_tokens is None:
        ns.max_tokens = 64 if ns.quick else 128
    if ns.requests is None:
        ns.requests = 6 if ns.quick else 10
    if ns.ttft_requests is None:
        ns.ttft_requests = 24 if ns.quick else 48
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("libp2p").setLevel(logging.ERROR)
    started = time.perf_counter()
    out = trio.run(main, ns)
    out["bench_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out))
