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
    converge_loopback_bytes_per_event_per_node  bytes on the loopback interface
                           during that phase, per event and node (all traffic:
                           gossip, anti-entropy, DHT, TCP/IP headers)
    converge_event_bytes   the mean size of those events
    idle_bytes_per_s_per_node, idle_cpu_ms_per_s_per_node  the same swarm with
                           no events for 10 s (heartbeats, sync rounds, DHT)
    event_bytes_per_node, event_cpu_ms_per_node  what one event adds to that
                           background, per node (docs/scale.md uses them)
    catchup_10k_s          a node that was offline while another wrote 10,000 events:
                           from its restart to having applied all of them
    bytes_per_request_worker   a hub (auth, gateway) and an inference-only worker
    bytes_per_request_gateway  (synthetic model), 10,000 requests through the
                           gateway's RPC path: growth of each node's database
                           per request (after a WAL checkpoint), once the worker
                           has the usage totals of all of them
    worker_request_logs    request log rows the worker holds then (0: the log
                           lane stays with the gateway and its keepers)
    catchup_1m_requests_replay_s  a hub (auth, gateway) whose ledger holds a
                           million generated requests (what its usage recorder
                           writes for them: flushes of 200 requests, 100
                           users); an inference-only worker that never loads
                           a checkpoint joins: from its start to having
                           applied every event of the hub
    checkpoint_make_s, checkpoint_bytes, checkpoint_rows, checkpoint_prune_s,
    checkpoint_pruned_events  the hub then makes a signed checkpoint of its
                           state and prunes the events it covers
    catchup_1m_requests_s  another inference-only worker joins: from its start
                           to holding the hub's state (from the checkpoint)
    bytes_per_request_worker_checkpoint  that worker's database per request
    catchup_1m_requests_keeper_s  a node granted metrics (a keeper of the hub's
                           request logs) joins: until it also holds all of them
    state_rows, state_checkpoint_bytes, state_make_s, state_check_s,
    state_load_s, state_rows_per_s, state_db_bytes  a checkpoint of 30 days
                           (--quick: 3) of 3 gateways serving 100 users every
                           hour (a usage row per gateway, user, key and hour):
                           made, checked against its root, loaded into an
                           empty store; that store's size
    machine                nproc, CPU model, Python, date

Usage: python benchmarks/bench_ledger.py [--quick] [--nodes N] [--only-converge]
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
from p2pinfer.ledger.checkpoints import make_checkpoint, open_checkpoint  # noqa: E402
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
PASSWORD = "correct horse battery staple 42"
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
        # the swarm's own background (heartbeats, sync rounds, DHT) with no events
        lo, cpu, t_idle = loopback_bytes(), time.process_time(), trio.current_time()
        await trio.sleep(IDLE_SECONDS)
        idle_s = trio.current_time() - t_idle
        idle_bytes = (loopback_bytes() - lo) / idle_s / n_nodes
        idle_cpu = (time.process_time() - cpu) / idle_s / n_nodes
        written: list[tuple[tuple[str, int], float]] = []
        lo = loopback_bytes()
        cpu = time.process_time()
        t_timed = trio.current_time()
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
        lo_bytes = loopback_bytes() - lo
        timed_s = trio.current_time() - t_timed
        event_bytes = sum(len(lg.store.conn.execute(
            "SELECT raw FROM events WHERE author=? AND seq=?", ev_id).fetchone()[0])
            for ev_id, _ in written[:50] for lg in ledgers[:1]) / min(50, len(written))
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
    return {"startup_10_nodes_s" if n_nodes == 10 else f"startup_{n_nodes}_nodes_s": startup_s,
            "converge_cpu_ms_per_event": cpu_per_event_ms,
            "converge_mesh_sizes": mesh, "converge_pubsub_peers": pubsub_peers,
            "converge_p50_ms": median(times),
            "converge_p99_ms": pct(times, 0.99), "converge_max_ms": max(times),
            "converge_events": len(times), "converge_nodes": n_nodes,
            "converge_event_bytes": event_bytes,
            "converge_loopback_bytes_per_event_per_node": (
                lo_bytes / n_events / n_nodes if lo_bytes >= 0 else None),
            "idle_bytes_per_s_per_node": idle_bytes,
            "idle_cpu_ms_per_s_per_node": idle_cpu * 1000,
            # what the events add to the background, per event and node
            "event_bytes_per_node": (lo_bytes - idle_bytes * n_nodes * timed_s)
            / n_events / n_nodes,
            "event_cpu_ms_per_node": (cpu_per_event_ms / 1000 * n_events
                                      - idle_cpu * n_nodes * timed_s)
            / n_events / n_nodes * 1000,
            "converge_rate_per_s": rate,
            "converge_usage_applied_via_gossip": via_gossip}


IDLE_SECONDS = 10.0


def loopback_bytes() -> int:
    """Bytes received on the loopback interface so far (-1 if unknown)."""
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[0])
    except OSError:
        pass
    return -1


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


# -- bytes per request ------------------------------------------------------------------
def db_bytes(node: Node) -> int:
    """The size of a node's database once its write-ahead log is moved in."""
    node.ledger.store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return node.config.database_path.stat().st_size


async def bench_requests(root: Path, n: int, concurrency: int = 8) -> dict[str, Any]:
    """A hub and a worker; ``n`` requests through the gateway; database growth."""
    homes = [root / "hub", root / "worker"]
    owner = create_network(homes[0], name="bench")
    roles = [["auth", "gateway"], ["inference"]]
    save_member_cert(homes[0], admit(owner, Identity.load_or_create(homes[0]).peer_id,
                                     roles[0]))
    peer = Identity.load_or_create(homes[1]).peer_id
    import_join_token(homes[1], make_join_token(owner.network, admit(owner, peer, roles[1])),
                      peer_id=peer)
    tables: dict[str, Any] = {
        "ledger": LEDGER,
        "models": [{"name": "fake", "backend": "synthetic", "tokens": 16}],
        "auth": {"argon2_memory_kib": 1024, "argon2_time_cost": 1, "registration_wait": 0},
        "gateway": {"default_rate_limit": 10 * n, "default_token_limit": 100 * n},
    }

    def cfg(i: int, bootstrap: list[str]) -> NodeConfig:
        return NodeConfig.from_mapping({
            "node": {"home": str(homes[i]), "roles": roles[i],
                     "listen": ["/ip4/127.0.0.1/tcp/0"], "bootstrap": bootstrap,
                     "announce_interval": 1.0, "descriptor_ttl": 2.0},
            **tables}, env={})

    size = db_bytes

    async with trio.open_nursery() as nursery:
        hub = Node(cfg(0, []))
        await nursery.start(hub.run)
        worker = Node(cfg(1, [hub.addrs[0]]))
        await nursery.start(worker.run)
        with trio.fail_after(60):
            me = hub.peer_id
            await hub.rpc.call(me, "registerUser", {"username": "bench", "password": PASSWORD,
                                                    "email": "bench@example.com"})
            session = await hub.rpc.call(me, "loginUser", {"username": "bench",
                                                           "password": PASSWORD})
            key = await hub.rpc.call(me, "generateApiKey", {"token": session["token"]})
            user = session["user"]["user_id"]
            for _ in range(300):  # the worker's descriptor reaches the hub
                if await hub.discovery.find_model("fake"):
                    break
                await trio.sleep(0.2)
            await worker.ledger.wait_until(lambda: worker.ledger.user(user) is not None)
        await wait_quiet()
        before = {"hub": size(hub), "worker": size(worker)}
        auth = {"api_key": key["api_key"]}
        todo = iter(range(n))

        async def client() -> None:
            for i in todo:
                async with hub.rpc.stream(me, "processInferenceRequest", {
                        "request": {"prompt": f"request {i}", "model": "fake"},
                        "auth": auth}) as stream:
                    async for _ in stream:
                        pass

        t = trio.current_time()
        async with trio.open_nursery() as clients:
            for _ in range(concurrency):
                clients.start_soon(client)
        elapsed = trio.current_time() - t

        def requests_seen(node: Node) -> int:
            return sum(u.request_count for u in node.ledger.usage(user_id=user))

        with trio.fail_after(120):
            for node in (hub, worker):
                await node.ledger.wait_until(lambda node=node: requests_seen(node) >= n)
        after = {"hub": size(hub), "worker": size(worker)}
        held = worker.ledger.store.conn.execute("SELECT count(*) FROM request_logs").fetchone()
        nursery.cancel_scope.cancel()
    return {"bytes_per_request_worker": (after["worker"] - before["worker"]) / n,
            "bytes_per_request_gateway": (after["hub"] - before["hub"]) / n,
            "worker_request_logs": held[0], "requests": n,
            "requests_per_s": n / elapsed}


# -- joining after a million requests ----------------------------------------------------
def generate_history(store: Store, gateway: Identity, n: int, users: int = 100) -> int:
    """What a gateway's usage recorder writes for ``n`` requests, flushed every
    200 requests: per flush a usage event, four request-log events of 50 rows
    and a key-use event for the keys not written within the last
    KEY_USE_INTERVAL. Returns the number of events written."""
    from p2pinfer.gateway.usage import FLUSH_ROWS, KEY_USE_INTERVAL, MAX_ROWS_PER_EVENT

    ids = [str(uuid.uuid4()) for _ in range(users)]
    keys = [str(uuid.uuid4()) for _ in range(users)]
    written = 0
    key_written: dict[int, float] = {}
    base = time.time() - n / 100  # at 100 requests per second, ending now
    for start in range(0, n, FLUSH_ROWS):
        now = base + start / 100
        hour = int(now) - int(now) % 3600
        rows = [{"id": str(uuid.uuid4()), "user_id": ids[i % users],
                 "api_key_id": keys[i % users], "prompt_hash": f"{i:064x}",
                 "model_used": "smollm2", "response_time_ms": 120.5, "tokens_used": 40,
                 "status": "success", "created_at": now}
                for i in range(start, min(n, start + FLUSH_ROWS))]
        usage: dict[int, list[int]] = {}
        for i in range(start, start + len(rows)):
            slot = usage.setdefault(i % users, [0, 0])
            slot[0] += 1
            slot[1] += 40
        items: list[tuple[str, dict[str, Any]]] = [("usage", {"entries": [
            {"user_id": ids[u], "key_id": keys[u], "hour": hour, "requests": r, "tokens": t}
            for u, (r, t) in usage.items()]})]
        items += [("log.requests", {"rows": rows[i:i + MAX_ROWS_PER_EVENT]})
                  for i in range(0, len(rows), MAX_ROWS_PER_EVENT)]
        due = [u for u in usage if now - key_written.get(u, -1e18) >= KEY_USE_INTERVAL]
        if due:
            items.append(("apikey.used", {"entries": [{"key_id": keys[u], "at": now}
                                                       for u in due]}))
            key_written.update((u, now) for u in due)
        written += len(store.append(gateway, items))
    return written


async def bench_join(root: Path, n: int) -> dict[str, Any]:
    """Nodes joining a hub whose ledger holds ``n`` generated requests: one
    replaying every event, then (once the hub made a checkpoint and pruned)
    one loading the checkpoint, then a keeper of the hub's request logs."""
    homes = [root / "hub", root / "replayer", root / "worker", root / "keeper"]
    roles = [["auth", "gateway"], ["inference"], ["inference"], ["metrics"]]
    owner = create_network(homes[0], name="bench")
    hub_id = Identity.load_or_create(homes[0])
    certs = [admit(owner, hub_id.peer_id, roles[0])]
    save_member_cert(homes[0], certs[0])
    for home, r in zip(homes[1:], roles[1:], strict=True):
        peer = Identity.load_or_create(home).peer_id
        certs.append(admit(owner, peer, r))
        import_join_token(home, make_join_token(owner.network, certs[-1]), peer_id=peer)
    # The hub makes its checkpoint when told to (timed), and prunes at once;
    # the replayer never loads one.
    extra: list[dict[str, Any]] = [{"checkpoint_events": 0, "prune_after_days": 0},
                                   {"checkpoint_catchup": 0, "prune_after_days": -1}, {}, {}]

    def cfg(i: int, bootstrap: list[str]) -> NodeConfig:
        return NodeConfig.from_mapping({
            "node": {"home": str(homes[i]), "roles": [], "listen": ["/ip4/127.0.0.1/tcp/0"],
                     "bootstrap": bootstrap, "announce_interval": 3600},
            "ledger": {**LEDGER, "sync_interval": 1.0, **extra[i]}}, env={})

    store = Store(cfg(0, []).database_path, owner.network)
    store.absorb_docs([c.to_wire() for c in certs])
    t = time.perf_counter()
    events = generate_history(store, hub_id, n)
    generate_s = time.perf_counter() - t
    store.close()
    key = "catchup_1m_requests" if n == 1_000_000 else f"catchup_{n}_requests"
    out: dict[str, Any] = {"join_requests": n, "join_history_events": events,
                           "join_generate_s": generate_s}

    async def join(i: int, hub: Node, nursery: trio.Nursery) -> tuple[Node, float]:
        t = trio.current_time()
        node = Node(cfg(i, [hub.addrs[0]]))
        await nursery.start(node.run)
        with trio.fail_after(600):
            await node.ledger.wait_for_version(target)
            if i == 3:
                store = node.ledger.store
                await node.ledger.wait_until(lambda s=store: s.log_heads == logs_target)
        return node, trio.current_time() - t

    async with trio.open_nursery() as nursery:
        hub = Node(cfg(0, []))
        await nursery.start(hub.run)
        target = hub.ledger.version_vector()
        logs_target = dict(hub.ledger.store.log_heads)
        out["join_hub_db_bytes_before"] = db_bytes(hub)
        replayer, out[f"{key}_replay_s"] = await join(1, hub, nursery)
        assert replayer.ledger.checkpoints.loaded == 0
        out["join_replayer_db_bytes"] = db_bytes(replayer)
        replayer.stop()
        t = trio.current_time()
        header = await hub.ledger.checkpoints.make()
        out["checkpoint_make_s"] = trio.current_time() - t
        served = hub.ledger.store.served_checkpoint()
        assert served is not None and served[0] == header
        out["checkpoint_bytes"] = len(served[1])
        out["checkpoint_rows"] = header.rows
        t = trio.current_time()
        out["checkpoint_pruned_events"] = hub.ledger.checkpoints.prune()
        out["checkpoint_prune_s"] = trio.current_time() - t
        worker, out[f"{key}_s"] = await join(2, hub, nursery)
        assert worker.ledger.checkpoints.loaded == 1, "the worker did not load the checkpoint"
        out["join_worker_db_bytes"] = db_bytes(worker)
        out["bytes_per_request_worker_checkpoint"] = out["join_worker_db_bytes"] / n
        keeper, out[f"{key}_keeper_s"] = await join(3, hub, nursery)
        out["join_keeper_db_bytes"] = db_bytes(keeper)
        out["join_hub_db_bytes"] = db_bytes(hub)
        nursery.cancel_scope.cancel()
    return out


def bench_state(root: Path, hours: int, gateways: int = 3, users: int = 100) -> dict[str, Any]:
    """A checkpoint of a long-lived swarm's state: every one of ``users``
    (one key each) served by each of ``gateways`` in every one of ``hours``
    (a usage row per gateway, user, key and hour). Times making it (read
    the tables, hash, sign, compress), checking it (signature and every row
    against the root) and loading it into an empty store."""
    owner_id = Identity.generate()
    network = NetworkInfo(network_id_for(owner_id.public_key), owner_id.public_key)
    owner = Owner(owner_id, network)
    now = time.time()
    gws = [Identity.generate() for _ in range(gateways)]
    maker = Identity.generate()
    certs = [admit(owner, g.peer_id, ["gateway"], now=now - (hours + 24) * 3600) for g in gws]
    certs.append(admit(owner, maker.peer_id, ["auth"], now=now - (hours + 24) * 3600))
    ids = [(str(uuid.uuid4()), str(uuid.uuid4())) for _ in range(users)]
    source = Store(root / "source.db", network)
    source.absorb_docs([c.to_wire() for c in certs])
    first = int(now) // 3600 * 3600 - hours * 3600
    for g in gws:
        for start in range(0, hours, 50):
            source.append(g, [("usage", {"entries": [
                {"user_id": u, "key_id": k, "hour": first + h * 3600, "requests": 100,
                 "tokens": 4000} for u, k in ids]}) for h in range(start, min(hours, start + 50))])
    t = time.perf_counter()
    vv, columns, tables = source.read_state()
    ckpt = make_checkpoint(maker, network.network_id, vv, columns, tables,
                           [c.to_wire() for c in certs])
    body = ckpt.body()
    made = time.perf_counter() - t
    t = time.perf_counter()
    opened = open_checkpoint(ckpt.header, body, network.network_id)
    checked = time.perf_counter() - t
    joiner = Store(root / "joiner.db", network)
    t = time.perf_counter()
    joiner.load_checkpoint(opened, body)
    loaded = time.perf_counter() - t
    mine, theirs = source.snapshot(), joiner.snapshot()
    assert {k: v for k, v in mine.items() if k != "request_logs"} == {
        k: v for k, v in theirs.items() if k != "request_logs"}, "the state differs"
    joiner.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    out = {"state_hours": hours, "state_rows": ckpt.header.rows,
           "state_checkpoint_bytes": len(body), "state_make_s": made,
           "state_check_s": checked, "state_load_s": loaded,
           "state_rows_per_s": ckpt.header.rows / (checked + loaded),
           "state_db_bytes": (root / "joiner.db").stat().st_size}
    source.close()
    joiner.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (under 60 s)")
    parser.add_argument("--nodes", type=int, default=10,
                        help="nodes of the convergence run (10; docs/scale.md also uses 20)")
    parser.add_argument("--only-converge", action="store_true",
                        help="run the convergence phase only")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="events per second in the convergence run (20)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    out: dict[str, Any] = {"quick": args.quick}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_ledger_") as tmp:
        root = Path(tmp)
        if not args.only_converge:
            out.update(bench_apply(root / "apply", 5_000 if args.quick else 20_000))
        out.update(trio.run(bench_converge, root / "converge", args.nodes,
                            60 if args.quick else 300, args.rate))
        if not args.only_converge:
            out.update(trio.run(bench_catchup, root / "catchup", 10_000))
            out.update(trio.run(bench_requests, root / "requests", 10_000))
            out.update(trio.run(bench_join, root / "join",
                                100_000 if args.quick else 1_000_000))
            (root / "state").mkdir()
            out.update(bench_state(root / "state", 72 if args.quick else 720))
    out["elapsed_s"] = time.perf_counter() - started
    out["machine"] = {**machine(), "sqlite": sqlite3.sqlite_version}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
