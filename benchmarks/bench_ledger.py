"""Ledger benchmark: local apply rate, convergence across 10 nodes, catch-up.

Prints ONE JSON object:

    apply_events_per_s     signed events from peers checked (signature, membership,
                           replay) and applied to a fresh SQLite store, batches of 500
    append_events_per_s    local writes (sign + apply + commit), one event per transaction
    converge_p50_ms        10 real nodes (one process, loopback, star bootstrap): time
    converge_p99_ms        from append on one node to applied on all nine others
    converge_events        how many events were timed
    converge_cpu_ms_per_event  CPU of the whole 10-node process per event written
                           (replication to nine nodes), during the timed phase
    catchup_10k_s          a node that was offline while another wrote 10,000 events:
                           from its restart to having applied all of them
    machine                nproc, CPU model, Python, date

Usage: python benchmarks/bench_ledger.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, median, pct  # noqa: E402

from p2pinfer.config import NodeConfig  # noqa: E402
from p2pinfer.identity import Identity  # noqa: E402
from p2pinfer.ledger import Store  # noqa: E402
from p2pinfer.ledger.events import Event, sign_event  # noqa: E402
from p2pinfer.ledger.membership import (  # noqa: E402
    NetworkInfo,
    Owner,
    admit,
    create_network,
    import_join_token,
    make_join_token,
    network_id_for,
    save_member_cert,
)
from p2pinfer.node import Node  # noqa: E402

ROLES = ["auth", "gateway"]
LEDGER = {"sync_interval": 2.0}


def body_for(i: int, user: str) -> tuple[str, dict[str, Any]]:
    """A realistic mix: usage and request logs from gateways, audit and key use."""
    now = time.time()
    hour = int(now) - int(now) % 3600
    r = i % 4
    if r == 0:
        return "usage", {"entries": [{"user_id": user, "key_id": None, "hour": hour,
                                      "requests": 1, "tokens": 40 + i % 50}]}
    if r == 1:
        return "request.logged", {"rows": [{
            "id": str(uuid.uuid4()), "user_id": user, "api_key_id": None,
            "prompt_hash": f"{i:064x}", "model_used": "smollm2", "response_time_ms": 12.5,
            "tokens_used": 40, "status": "success", "created_at": now}]}
    if r == 2:
        return "apikey.used", {"entries": [{"key_id": user, "at": now}]}
    return "audit", {"actor": user, "action": "login", "outcome": "success", "time": now}


def make_homes(root: Path, n: int) -> list[Path]:
    homes = [root / f"n{i}" for i in range(n)]
    owner = create_network(homes[0], name="bench")
    save_member_cert(homes[0], admit(owner, Identity.load_or_create(homes[0]).peer_id, ROLES))
    for home in homes[1:]:
        peer = Identity.load_or_create(home).peer_id
        import_join_token(home, make_join_token(owner.network, admit(owner, peer, ROLES)),
                          peer_id=peer)
    return homes


def config(home: Path, bootstrap: list[str]) -> NodeConfig:
    return NodeConfig.from_mapping({
        "node": {"home": str(home), "roles": [], "listen": ["/ip4/127.0.0.1/tcp/0"],
                 "bootstrap": bootstrap, "announce_interval": 3600},
        "ledger": LEDGER,
    }, env={})


# -- local apply ----------------------------------------------------------------------
def bench_apply(root: Path, n: int) -> dict[str, float]:
    owner_key = Identity.generate()
    network = NetworkInfo(network_id_for(owner_key.public_key), owner_key.public_key)
    owner = Owner(owner_key, network)
    authors = [Identity.generate() for _ in range(4)]
    certs = [admit(owner, a.peer_id, ROLES) for a in authors]
    user = str(uuid.uuid4())
    raws: list[bytes] = []
    seqs = [0] * len(authors)
    base = int(time.time() * 1000) << 16
    for i in range(n):
        k = i % len(authors)
        seqs[k] += 1
        kind, body = body_for(i, user)
        raws.append(sign_event(authors[k], network.network_id, seqs[k], base + i, kind,
                               body).raw)
    store = Store(root / "apply.db", network)
    store.absorb_docs([c.to_wire() for c in certs])
    t = time.perf_counter()
    for i in range(0, n, 500):
        report = store.ingest(raws[i:i + 500])
        assert not report.rejected and report.held == 0
    apply_s = time.perf_counter() - t
    assert store.count_events() == n
    # local writes: one event per transaction, signed on the spot
    local = Store(root / "append.db", network)
    local.absorb_docs([c.to_wire() for c in certs])
    m = n // 4
    t = time.perf_counter()
    for i in range(m):
        local.append(authors[0], [body_for(i, user)])
    append_s = time.perf_counter() - t
    store.close()
    local.close()
    return {"apply_events_per_s": n / apply_s, "append_events_per_s": m / append_s}


# -- convergence ----------------------------------------------------------------------
async def bench_converge(root: Path, n_nodes: int, n_events: int, rate: float) -> dict[str, Any]:
    homes = make_homes(root, n_nodes)
    applied: dict[tuple[str, int], list[float]] = {}

    def recorder(events: list[Event]) -> None:
        now = trio.current_time()
        for ev in events:
            applied.setdefault(ev.id, []).append(now)

    async with trio.open_nursery() as nursery:
        t_start = trio.current_time()
        first = Node(config(homes[0], []))
        await nursery.start(first.run)
        nodes = [first]
        for home in homes[1:]:
            node = Node(config(home, [first.addrs[0]]))
            await nursery.start(node.run)
            nodes.append(node)
        ledgers = [n.ledger for n in nodes]
        user = str(uuid.uuid4())
        rng = random.Random(7)
        with trio.fail_after(60):
            for lg in ledgers:  # every node knows every member
                await lg.wait_until(lambda lg=lg: all(lg.is_member(n.peer_id) for n in nodes))
            startup_s = trio.current_time() - t_start
            # Start-up (90 connections: Noise, identify, DHT refresh, pubsub
            # and ledger greetings) keeps the one Python process busy for a few
            # seconds; convergence is measured in the steady state after it.
            await wait_quiet()
            warm = []
            for i in range(n_events // 3):
                warm.append(rng.choice(ledgers).append(*body_for(i, user)).id)
                await trio.sleep(1 / rate)
            for lg in ledgers:
                await lg.wait_for_version(dict(warm))
        for lg in ledgers:
            lg.subscribe(recorder)
        written: list[tuple[tuple[str, int], float]] = []
        cpu = time.process_time()
        for i in range(n_events):
            lg = rng.choice(ledgers)
            t = trio.current_time()
            ev = lg.append(*body_for(i, user))
            written.append((ev.id, t))
            await trio.sleep(1 / rate)
        with trio.fail_after(60):
            for lg in ledgers:
                await lg.wait_for_version({a: s for (a, s), _ in written})
        cpu_per_event_ms = (time.process_time() - cpu) / n_events * 1000
        times = []
        for ev_id, t in written:
            stamps = applied[ev_id]
            assert len(stamps) == n_nodes  # the author's own apply plus nine others
            times.append((max(stamps) - t) * 1000)
        via_gossip = sum(lg.metrics.registry.get_sample_value(
            "ai_platform_ledger_events_applied_total",
            {"kind": "usage", "source": "gossip"}) or 0 for lg in ledgers)
        gossip = [lg.gossip for lg in ledgers if lg.gossip is not None]
        mesh = [len(g.router.mesh.get(g.topic, ())) for g in gossip]
        pubsub_peers = [len(g.pubsub.peers) for g in gossip]
        nursery.cancel_scope.cancel()
    return {"startup_10_nodes_s": startup_s,
            "converge_cpu_ms_per_event": cpu_per_event_ms,
            "converge_mesh_sizes": mesh, "converge_pubsub_peers": pubsub_peers,
            "converge_p50_ms": median(times),
            "converge_p99_ms": pct(times, 0.99), "converge_max_ms": max(times),
            "converge_events": len(times), "converge_nodes": n_nodes,
            "converge_usage_applied_via_gossip": via_gossip}


async def wait_quiet(window: float = 0.5, busy: float = 0.25) -> None:
    """Wait until this process used under ``busy`` of a core for ``window`` s."""
    while True:
        cpu = time.process_time()
        await trio.sleep(window)
        if time.process_time() - cpu < busy * window:
            return


# -- catch-up -------------------------------------------------------------------------
async def bench_catchup(root: Path, n: int) -> dict[str, Any]:
    homes = make_homes(root, 2)
    async with trio.open_nursery() as nursery:
        writer = Node(config(homes[0], []))
        await nursery.start(writer.run)
        with trio.fail_after(60):
            async with trio.open_nursery() as once:  # the reader has been a member before
                reader = Node(config(homes[1], [writer.addrs[0]]))
                await once.start(reader.run)
                await reader.ledger.wait_for_version(writer.ledger.version_vector())
                reader.stop()
        reader.ledger.close()
        user = str(uuid.uuid4())
        for i in range(0, n, 500):  # written while the reader is offline
            writer.ledger.append_many([body_for(i + j, user) for j in range(500)])
            await trio.lowlevel.checkpoint()
        target = writer.ledger.version_vector()
        t = trio.current_time()
        back = Node(config(homes[1], [writer.addrs[0]]))
        await nursery.start(back.run)
        with trio.fail_after(120):
            await back.ledger.wait_for_version(target)
        elapsed = trio.current_time() - t
        assert back.ledger.store.count_events() == writer.ledger.store.count_events()
        nursery.cancel_scope.cancel()
    return {"catchup_10k_s" if n == 10_000 else f"catchup_{n}_s": elapsed, "catchup_events": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (under 60 s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    out: dict[str, Any] = {"quick": args.quick}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_ledger_") as tmp:
        root = Path(tmp)
        out.update(bench_apply(root / "apply", 5_000 if args.quick else 20_000))
        out.update(trio.run(bench_converge, root / "converge", 10,
                            60 if args.quick else 300, 20.0))
        out.update(trio.run(bench_catchup, root / "catchup", 10_000))
    out["elapsed_s"] = time.perf_counter() - started
    out["machine"] = {**machine(), "sqlite": sqlite3.sqlite_version}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
