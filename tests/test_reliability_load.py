"""Load: 1,000 concurrent clients through two gateways to three workers,
30 rounds, zero errors, and no memory growth in any daemon (issue 10).

Five daemons (in their own network namespaces where permitted), the
synthetic backend paced at 8 tokens x 20 ms so that the 1,000 requests of a
round are all in flight at once. The clients are tasks spread over 20
client peers (20 connections, ten per gateway), as 1,000 users of a few
applications would be. After every round the resident memory of every
daemon is sampled (anonymous memory: the heap, what a leak grows). The
first :data:`WARMUP` (ten) rounds fill caches, buffers and SQLite's page
cache; across the twenty rounds after them each daemon's trend is
estimated (Theil-Sen: the median of the slopes between every pair of
rounds, robust to an allocator step near either end). The median trend of
the five daemons must stay under :data:`MAX_SLOPE_BYTES` per round of 1,000
requests (under 200 bytes per request), and every single one under
:data:`MAX_NODE_SLOPE_BYTES`: one daemon's heap can step by 2 MB mid-run
(a new malloc arena), which moves its own estimate to ~300 kB per round in
a busy CI run, while a leak moves all of them. (With ten measured rounds
the noise came too close to the leak this test exists for.)
Usage must then be exact on every node.

Measured (``benchmarks/RELIABILITY.md``): flat. Before the fix in
:mod:`p2pinfer.ledger.gossip` the heap rose by 0.4-0.7 MB per round on
every node: py-libp2p's GossipSub kept the last 1,000 whole messages for its
equivocation check (in protobuf's C heap, invisible to tracemalloc) and one
float per message for ever; this test fails on that code (328-449 kB per
round on every daemon, median 365).

The figures are written to ``test-artifacts/reliability/load.json`` (used by
``benchmarks/RELIABILITY.md``). ``benchmarks/chaos.py load`` runs the same
for longer.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio

from .chaos_harness import (
    REPO,
    Cluster,
    Observer,
    ask,
    client_peer,
    connect_all,
    read_ledger,
    register_user,
    synthetic,
)
from .helpers import wait_for

pytestmark = pytest.mark.slow

LAYOUT = {"g1": ["auth", "gateway"], "g2": ["gateway"], "w1": ["inference"],
          "w2": ["inference"], "w3": ["inference"]}
TABLES = {"models": [synthetic(tokens=8, token_delay=0.02)],
          "gateway": {"default_rate_limit": 10**9, "concurrent_per_key": 0,
                      "concurrent_per_user": 0,
                      "usage_flush_interval": 0.5},
          "inference": {"max_queue": 4096}}
CLIENTS = 1000
PEERS = 20
WARMUP = 10
ROUNDS = WARMUP + 20
MAX_SLOPE_BYTES = 192 * 1024  # median of the daemons, per round of 1,000 requests
MAX_NODE_SLOPE_BYTES = 384 * 1024  # any one daemon


def slope(values: list[float]) -> float:
    """The trend of ``values`` against 0, 1, 2, ...: the Theil-Sen estimate
    (median of the slopes between every pair of points), which a steady
    leak moves and one step of the allocator does not."""
    pairs = [(values[j] - values[i]) / (j - i)
             for i in range(len(values)) for j in range(i + 1, len(values))]
    return statistics.median(pairs)


async def run_load(tmp_path: Path, *, clients: int = CLIENTS, rounds: int = ROUNDS,
                   peers: int = PEERS, netns: bool | None = None) -> dict[str, Any]:
    """The load run; returns its figures (also used by benchmarks/chaos.py)."""
    cluster = Cluster(tmp_path / "swarm", LAYOUT, TABLES, netns=netns)
    out: dict[str, Any] = {"clients": clients, "rounds": rounds, "client_peers": peers,
                           "namespaces": cluster.topology.namespaced}
    with cluster:
        try:
            await trio.to_thread.run_sync(cluster.start)
            observer = Observer(cluster)
            async with contextlib.AsyncExitStack() as stack:
                pool = [await stack.enter_async_context(client_peer()) for _ in range(peers - 1)]
                pool.append(await stack.enter_async_context(client_peer(observer.identity)))
                gw_addrs = [cluster.addr_of("g1"), cluster.addr_of("g2")]
                for peer in pool:
                    gateways = await connect_all(peer, gw_addrs)
                user = await register_user(pool[0].rpc, gateways[0], "loadtest")
                key = user["api_key"]

                async def ready(gw: str) -> bool:
                    listed = await pool[0].rpc.call(gw, "listModels", {"auth": {"api_key": key}})
                    return any(m["workers"] == 3 for m in listed["models"])

                for gw in gateways:
                    await wait_for(lambda gw=gw: ready(gw), limit=30, interval=0.1)
                rss: dict[str, list[int]] = {n: [] for n in cluster.names}
                anon: dict[str, list[int]] = {n: [] for n in cluster.names}
                kinds: Counter[str] = Counter()
                tokens = 0
                walls, peaks = [], []
                for r in range(rounds):
                    in_flight = peak = 0
                    t0 = trio.current_time()

                    async def one(i: int, r: int = r) -> None:
                        nonlocal in_flight, peak, tokens
                        peer = pool[i % peers]
                        in_flight += 1
                        peak = max(peak, in_flight)
                        o = await ask(peer.rpc, gateways[(i // peers) % 2], key,
                                      f"round {r} client {i}", limit=120)
                        in_flight -= 1
                        kinds[o.kind] += 1
                        if o.ok:
                            tokens += o.tokens
                        elif sum(kinds.values()) - kinds["ok"] <= 3:
                            print("error:", o.kind, o.error)

                    async with trio.open_nursery() as nursery:
                        for i in range(clients):
                            nursery.start_soon(one, i)
                    walls.append(trio.current_time() - t0)
                    peaks.append(peak)
                    for name, node in cluster.nodes.items():
                        mem = node.memory()
                        rss[name].append(mem["rss"])
                        anon[name].append(mem.get("anon", mem["rss"]))
                out["requests"] = sum(kinds.values())
                out["outcomes"] = dict(kinds)
                out["errors"] = out["requests"] - kinds["ok"]
                out["peak_in_flight"] = min(peaks)
                out["round_wall_s"] = [round(w, 2) for w in walls]
                out["rps"] = round(out["requests"] / sum(walls))
                out["rss_mb"] = {n: [round(v / 2**20, 1) for v in vs] for n, vs in rss.items()}
                warm = min(WARMUP, max(0, rounds - 3))
                out["rss_slope_kb_per_round"] = {n: round(slope(vs[warm:]) / 1024, 1)
                                                 for n, vs in rss.items()}
                out["anon_mb"] = {n: [round(v / 2**20, 1) for v in vs] for n, vs in anon.items()}
                out["anon_slope_kb_per_round"] = {n: round(slope(vs[warm:]) / 1024, 1)
                                                  for n, vs in anon.items()}
                out["tokens"] = tokens
                # usage on every node: exact, once everything is flushed
                async def flushed() -> bool:
                    for gw in gateways:
                        h = await pool[0].rpc.call(gw, "getServiceHealth", {})
                        if h["usage_pending"] or h["in_flight"]:
                            return False
                    return True

                await wait_for(flushed, limit=60, interval=0.2)
                every = await connect_all(pool[-1], [cluster.addr_of(n) for n in cluster.names])
                await observer.wait_converged(pool[-1].rpc, every, limit=60)
                codes = await trio.to_thread.run_sync(cluster.stop_all)
                out["exit_codes"] = codes
            ledgers = {n: read_ledger(cluster.nodes[n].db) for n in cluster.names}
            out["usage"] = {n: list(lf.usage_of(user["user_id"])) for n, lf in ledgers.items()}
            out["events_equal"] = all(lf.events == ledgers["g1"].events
                                      for lf in ledgers.values())
        except BaseException:
            print(cluster.logs())
            raise
    return out


async def test_thousand_concurrent_clients_memory_flat(tmp_path: Path) -> None:
    with trio.fail_after(300):
        out = await run_load(tmp_path)
    artifacts = REPO / "test-artifacts" / "reliability"
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "load.json").write_text(json.dumps(out, indent=1))
    assert out["errors"] == 0, out["outcomes"]
    assert out["requests"] == CLIENTS * ROUNDS
    assert out["peak_in_flight"] >= 0.9 * CLIENTS  # really 1,000 at once
    assert all(code == 0 for code in out["exit_codes"].values())
    expected = [CLIENTS * ROUNDS, out["tokens"]]
    assert all(usage == expected for usage in out["usage"].values()), out["usage"]
    assert out["events_equal"]
    slopes = out["anon_slope_kb_per_round"]
    assert statistics.median(slopes.values()) * 1024 < MAX_SLOPE_BYTES, out["anon_mb"]
    for name, kb in slopes.items():
        assert kb * 1024 < MAX_NODE_SLOPE_BYTES, (name, out["anon_mb"][name])
