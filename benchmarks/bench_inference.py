"""Benchmark of the inference role on the embedded model: the worker versus the
same llama.cpp runner called directly, in one run, at 1, 2, 4 and 8
concurrent requests of 64 and 256 tokens.

Prints one JSON object:

- ``agg_tok_s``: for each ``"<tokens>"`` and ``"<concurrency>"``, aggregate
  completion tokens/s
  - ``worker``: through ``processPrompt`` from a client host to a worker host
    (the inference role, RPC over Noise + yamux on loopback), timed by the
    client;
  - ``direct``: the same runner (the worker's own llama-server process) asked
    directly over HTTP with the same streamed request the backend sends;
  - ``ratio``: worker / direct (goal >= 0.95 at every concurrency); each
    path is timed ``--pairs`` times per cell (4 by default), in rounds of
    worker, direct, direct, worker (or the reverse), and the figures
    averaged; every timed pass asks for at least ``PASS_TOKENS`` (1,024)
    completion tokens, so a one-stream pass of 64-token answers sends 16
    requests one after the other;
  - ``cpu_ms_per_token``: this process's CPU time per token on each path
    (the worker role and the client host for ``worker``, the HTTP client
    for ``direct``; the runner's own CPU is not in it);
  - ``inprocess``: the in-process llama-cpp-python engine this project used
    before the runner (``--inprocess-tree DIR``: a checkout of commit 4a81836
    with its own .venv; its engine alone, slots = concurrency, one thread per
    slot, its best layout), measured in the same run;
- ``agg8_vs_inprocess_best``: the worker's aggregate at 8 concurrent over the
  in-process engine's best aggregate at any concurrency (goal >= 1.6);
- ``ttft_overhead_ms``: time to first token through the worker minus direct,
  the median of paired differences over short requests (goal < 10);
- ``peak_rss_mib``: the largest resident memory seen, sampled every 100 ms,
  of this process (the worker role and the client host) plus its runner,
  and of the runner alone;
- ``variant``: which llama.cpp variant ran (CPU features, repacking, why).

Every request uses temperature 0 and ``cache: false`` (no answer comes from
the worker's response cache). Worker and direct get the same prompts, each
first asked once untimed so that the runner's prompt cache serves both timed
passes alike; ``same_text`` checks that they gave the same answers.

    .venv/bin/python benchmarks/bench_inference.py --quick            # ~2 minutes
    .venv/bin/python benchmarks/bench_inference.py --inprocess-tree /tmp/old
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine  # noqa: E402

TOPICS = ["a robot who paints", "a lighthouse keeper", "a lost city", "a dragon who cooks",
          "a time traveller", "a river spirit", "a clockmaker", "a desert caravan",
          "a snow leopard", "a sailing ship", "a library at night", "a mountain village",
          "a brave mouse", "an old piano", "a garden on Mars", "a night train"]
CONCURRENCY = (1, 2, 4, 8)
TOKENS = (64, 256)
SLOTS = 8


# Completion tokens per timed pass (at least): short passes are at the mercy
# of a shared machine's hiccups, so small cells send more requests per client.
PASS_TOKENS = 1024


def per_client(concurrency: int, max_tokens: int, minimum: int) -> int:
    """Requests each client sends in one timed pass of a cell."""
    return max(minimum, -(-PASS_TOKENS // (concurrency * max_tokens)))


def prompt_for(i: int) -> str:
    return f"Write a long story about {TOPICS[i % len(TOPICS)]} (number {i})."


# -- the worker and its runner ------------------------------------------------------------
@asynccontextmanager
async def worker(tables: dict[str, Any]) -> AsyncIterator[tuple[Any, Any, str]]:
    """The inference role on one host; an RPC client on another."""
    import multiaddr

    from p2pinfer.config import NodeConfig
    from p2pinfer.identity import Identity
    from p2pinfer.inference import InferenceRole
    from p2pinfer.rpc import RPC_PROTOCOL, RpcClient, RpcServer, make_host
    from p2pinfer.rpc.host import guard_handler
    from p2pinfer.testing import FakeContext

    config = NodeConfig.from_mapping({"node": {"home": "/tmp/bench-unused"}, **tables}, env={})
    role = InferenceRole(FakeContext(config))
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


async def worker_run(client: Any, peer: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    started = trio.current_time()
    first = None
    parts = []
    async with client.stream(peer, "processPrompt", {
            "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "cache": False}) as stream:
        async for chunk in stream:
            if first is None:
                first = trio.current_time()
            parts.append(chunk["delta"])
    ended = trio.current_time()
    return {"text": "".join(parts), "tokens": stream.trailer["usage"]["completion_tokens"],
            "ttft": (first or ended) - started, "seconds": ended - started}


class Direct:
    """The worker's own runner, asked over HTTP like the backend asks it."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        session = backend._session
        self.url = f"{session.process.url}/v1/chat/completions"
        self.client = httpx.AsyncClient(headers=session.process.headers(), timeout=120,
                                        limits=httpx.Limits(max_connections=32,
                                                            keepalive_expiry=2.0))

    async def run(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        from p2pinfer.inference import GenerationParams, GenerationRequest, Message

        body = self.backend.request_body(GenerationRequest(
            (Message("user", prompt),), GenerationParams(max_tokens=max_tokens,
                                                         temperature=0.0)))
        started = trio.current_time()
        first = None
        parts: list[str] = []
        tokens = 0
        sent = self.client.build_request("POST", self.url, json=body)
        try:
            response = await self.client.send(sent, stream=True)
        except httpx.RemoteProtocolError:  # a kept-alive connection closed as we sent
            response = await self.client.send(sent, stream=True)
        try:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                for choice in obj.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if first is None:
                            first = trio.current_time()
                        parts.append(text)
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
        finally:
            await response.aclose()
        ended = trio.current_time()
        return {"text": "".join(parts), "tokens": tokens, "ttft": (first or ended) - started,
                "seconds": ended - started}


async def aggregate(run_one: Callable[[str, int], Awaitable[dict[str, Any]]],
                    concurrency: int, per_client: int, max_tokens: int, offset: int
                    ) -> tuple[float, dict[int, str], float]:
    """Completion tokens/s with ``concurrency`` clients, each sending
    ``per_client`` requests one after the other; the texts by prompt; and
    this process's CPU time per token (ms), the runner's excluded."""
    me = psutil.Process()
    cpu_before = sum(me.cpu_times()[:2])
    tokens = 0
    texts: dict[int, str] = {}

    async def client_loop(c: int) -> None:
        nonlocal tokens
        for k in range(per_client):
            i = offset + c * per_client + k
            result = await run_one(prompt_for(i), max_tokens)
            tokens += result["tokens"]
            texts[i] = result["text"]

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for c in range(concurrency):
            nursery.start_soon(client_loop, c)
    cpu_ms = (sum(me.cpu_times()[:2]) - cpu_before) * 1000 / max(1, tokens)
    return tokens / (trio.current_time() - started), texts, cpu_ms


class PeakRss:
    """The largest RSS seen of this process plus its children, and of the children."""

    def __init__(self) -> None:
        self.total = 0
        self.children = 0

    async def run(self) -> None:
        me = psutil.Process()
        while True:
            try:
                kids = sum(p.memory_info().rss for p in me.children(recursive=True))
                self.children = max(self.children, kids)
                self.total = max(self.total, me.memory_info().rss + kids)
            except psutil.Error:
                pass
            await trio.sleep(0.1)


# -- the in-process engine of commit 4a81836, for comparison ----------------------------------
INPROCESS = textwrap.dedent('''
    import json, sys, trio
    from contextlib import aclosing
    from p2pinfer.inference import (InferenceEngine, LlamaCppBackend, LlamaCppOptions,
                                    TextChunk, embedded_model_path, parse_prompt_params)
    CONC, TOKENS, PER = json.loads(sys.argv[1])
    TOPICS = json.loads(sys.argv[2])
    def prompt_for(i):
        return f"Write a long story about {TOPICS[i % len(TOPICS)]} (number {i})."
    async def main():
        out = {}
        for c in CONC:
            engine = InferenceEngine()
            engine.add_model(LlamaCppBackend("m", LlamaCppOptions(
                path=embedded_model_path(), slots=c, n_threads=1)))
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.run)
                await engine.wait_settled()
                async def one(prompt, n):
                    got = 0
                    req = parse_prompt_params({"prompt": prompt, "max_tokens": n,
                                               "temperature": 0, "cache": False})
                    async with aclosing(engine.generate(req)) as events:
                        async for e in events:
                            if not isinstance(e, TextChunk):
                                got = e.completion_tokens
                    return got
                # Warm every instance (its first request pays the page faults).
                async with trio.open_nursery() as warm:
                    for k in range(c):
                        warm.start_soon(one, prompt_for(990 + k), 16)
                for n in TOKENS:
                    total = 0
                    async def loop(k):
                        nonlocal total
                        for j in range(PER):
                            total += await one(prompt_for(5000 + 100 * c + k * PER + j), n)
                    t = trio.current_time()
                    async with trio.open_nursery() as inner:
                        for k in range(c):
                            inner.start_soon(loop, k)
                    out.setdefault(str(n), {})[str(c)] = round(total / (trio.current_time() - t), 1)
                    print(f"in-process c={c} n={n}: {out[str(n)][str(c)]}", file=sys.stderr)
                nursery.cancel_scope.cancel()
        print(json.dumps(out))
    trio.run(main)
''')


def inprocess(tree: Path, per: int) -> dict[str, Any]:
    python = tree / ".venv" / "bin" / "python"
    done = subprocess.run(
        [str(python), "-c", INPROCESS, json.dumps([list(CONCURRENCY), list(TOKENS), per]),
         json.dumps(TOPICS)], cwd=tree, capture_output=True, text=True, timeout=3600,
        env={**os.environ, "PYTHONPATH": str(tree)})
    sys.stderr.write(done.stderr[-2000:])
    if done.returncode != 0:
        raise SystemExit(f"the in-process engine failed: {done.stderr[-2000:]}")
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    return {"commit": commit, "agg_tok_s": json.loads(done.stdout.strip().splitlines()[-1])}


# -- the run --------------------------------------------------------------------------------
async def main(args: argparse.Namespace) -> dict[str, Any]:
    per = 1 if args.quick else 2  # the in-process engine's passes
    tables = {"inference": {"slots": SLOTS, "max_queue": 1000, "cache": False}}
    result: dict[str, Any] = {"machine": machine(), "config": {
        "model": "SmolLM2-135M-Instruct Q4_1", "slots": SLOTS, "pass_tokens": PASS_TOKENS,
        "timed_passes_per_path": 2 * (args.pairs // 2 or 1),
        "concurrency": list(CONCURRENCY), "max_tokens": list(TOKENS), "quick": args.quick}}
    result["machine"]["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    rss = PeakRss()
    async with trio.open_nursery() as top:
        top.start_soon(rss.run)
        async with worker(tables) as (role, client, peer):
            backend = role.engine.models["smollm2"].backend
            direct = Direct(backend)

            async def through(prompt: str, n: int) -> dict[str, Any]:
                return await worker_run(client, peer, prompt, n)

            # Warm both paths (page faults of the first requests, first streams).
            for i in range(2):
                await direct.run(prompt_for(900 + i), 16)
                await through(prompt_for(910 + i), 16)

            # Both paths get the same prompts, so they give the same answers
            # (temperature 0) of the same lengths. The runner reuses the KV
            # cache of a prompt it has seen, so every prompt is first asked
            # once, untimed, exactly like the timed passes: then each timed
            # pass finds the runner in the state the previous pass left.
            agg: dict[str, dict[str, Any]] = {}
            same = True
            offset = 0
            for n in TOKENS:
                for c in CONCURRENCY:
                    # Worker, direct, direct, worker (then the other way
                    # round in the next cell): drift of the machine's speed
                    # during a cell hits both paths alike.
                    first, second = ("worker", through), ("direct", direct.run)
                    if (c + n // 64) % 2:
                        first, second = second, first
                    rates: dict[str, list[float]] = {"worker": [], "direct": []}
                    cpu: dict[str, list[float]] = {"worker": [], "direct": []}
                    texts: dict[str, dict[int, str]] = {}
                    k = 1 if args.quick else per_client(c, n, 1)
                    await aggregate(direct.run, c, k, n, offset)  # primes the prompts
                    for _ in range(args.pairs // 2 or 1):
                        for name, run_one in (first, second, second, first):
                            tok_s, texts[name], ms = await aggregate(run_one, c, k, n, offset)
                            rates[name].append(tok_s)
                            cpu[name].append(ms)
                    row: dict[str, Any] = {name: round(statistics.mean(r), 1)
                                           for name, r in rates.items()}
                    row["ratio"] = round(row["worker"] / row["direct"], 3)
                    row["passes"] = len(rates["worker"])
                    row["cpu_ms_per_token"] = {name: round(statistics.mean(v), 3)
                                               for name, v in cpu.items()}
                    row["requests_per_client"] = k
                    same = same and texts["worker"] == texts["direct"]
                    agg.setdefault(str(n), {})[str(c)] = row
                    offset += c * k
                    print(f"{n} tokens, {c} concurrent: {row}", file=sys.stderr)

            # Time to first token: pairs of prompts of the same length, one
            # per path, first one path then the other.
            pairs = []
            for i in range(args.ttft_requests):
                a, b = prompt_for(4000 + 2 * i), prompt_for(4001 + 2 * i)
                if i % 2:
                    w = await through(a, 2)
                    d = await direct.run(b, 2)
                else:
                    d = await direct.run(a, 2)
                    w = await through(b, 2)
                pairs.append((d["ttft"], w["ttft"]))
            runtime = backend.runtime()
            await direct.client.aclose()
        top.cancel_scope.cancel()

    result["agg_tok_s"] = agg
    result["same_text"] = same
    result["ttft_direct_ms"] = round(statistics.median(d for d, _ in pairs) * 1000, 1)
    result["ttft_worker_ms"] = round(statistics.median(w for _, w in pairs) * 1000, 1)
    result["ttft_overhead_ms"] = round(statistics.median(w - d for d, w in pairs) * 1000, 2)
    result["peak_rss_mib"] = {"worker_with_runner": round(rss.total / 2**20, 1),
                              "runner": round(rss.children / 2**20, 1)}
    result["variant"] = {k: runtime[k] for k in (
        "variant", "repack", "repack_reason", "cpu_features", "threads", "slots", "kv_cache")}
    ratios = [row["ratio"] for by_c in agg.values() for row in by_c.values()]
    result["min_ratio"] = min(ratios)
    goals: dict[str, bool] = {
        "worker/direct>=0.95": min(ratios) >= 0.95,
        "ttft_overhead_ms<10": result["ttft_overhead_ms"] < 10,
    }
    if args.inprocess_tree:
        base = inprocess(Path(args.inprocess_tree), per)
        for n, by_c in base["agg_tok_s"].items():
            for c, value in by_c.items():
                agg[n][c]["inprocess"] = value
        best = max(v for by_c in base["agg_tok_s"].values() for v in by_c.values())
        top8 = max(agg[str(n)]["8"]["worker"] for n in TOKENS)
        result["inprocess"] = {"commit": base["commit"], "best_tok_s": best}
        result["agg8_vs_inprocess_best"] = round(top8 / best, 2)
        goals["agg8>=1.6x_inprocess_best"] = top8 >= 1.6 * best
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["goals"] = goals
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one request per client")
    parser.add_argument("--pairs", type=int, default=4,
                        help="timed passes per path and cell (in rounds of worker, direct, "
                             "direct, worker)")
    parser.add_argument("--ttft-requests", type=int, default=20,
                        help="short requests on each path for the time to first token")
    parser.add_argument("--inprocess-tree", default=None,
                        help="a checkout of commit 4a81836 with its .venv: measure the "
                             "in-process engine too")
    print(json.dumps(trio.run(main, parser.parse_args()), indent=2))
