"""Faults: daemons killed, restarted, cut off, slowed down, or out of disk,
while clients keep asking (issue 10).

Every scenario runs five real daemons (two gateways with auth, three
workers on the synthetic backend) as OS processes, each in its own network
namespace when this machine permits it (else on loopback, except the
partition, which needs namespaces). This process is the clients: non-member
peers with an API key, plus one member observer that reads the nodes'
version vectors. Each scenario then checks, after healing:

- every request got an answer or a clear error (``ask`` fails the test if
  one hangs), and only the errors the fault explains;
- every node holds the same committed events (and the killed node's
  events survived), no event is held back, SQLite integrity is ok;
- usage is exact: each request's log row (found by its prompt hash) has
  the tokens its client saw, and ``usage_stats`` on every node sums them;
- limits still hold: no ticket is left held, and the user's hourly limit
  then admits exactly what is left of it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pinfer import errors
from p2pinfer.gateway.coordinator import COORDINATOR_COOLDOWN
from p2pinfer.gateway.quota import WINDOW_SECONDS, rendezvous_order
from p2pinfer.gateway.usage import UsageRecorder

from .chaos_harness import (
    ClientPeer,
    Cluster,
    Observer,
    Outcome,
    ask,
    client_peer,
    connect_all,
    netns_unavailable_reason,
    read_ledger,
    record,
    register_user,
    request_hash,
    swarm_logs,
    synthetic,
)
from .helpers import wait_for

pytestmark = pytest.mark.slow

LAYOUT = {"g1": ["auth", "gateway"], "g2": ["auth", "gateway"], "w1": ["inference"],
          "w2": ["inference"], "w3": ["inference"]}
GATEWAYS = ("g1", "g2")
SCENARIO_SECONDS = 120  # the longest scenario, with margin
NETNS_SKIP = netns_unavailable_reason()


def gateway_table(limit: int, **extra: Any) -> dict[str, Any]:
    # The quota coordinator is waited for as long as by default (2 s): a
    # shorter wait made a busy machine's 0.5 s stall a failover, and each
    # failover lets the other gateway admit from its own counters (the
    # overshoot quota.py documents), which the exact counts here forbid. A
    # gateway that dies is failed over at once: its connection closes.
    return {"default_rate_limit": limit, "concurrent_per_key": 0,
            "concurrent_per_user": 0, "usage_flush_interval": 0.5,
            "cooldown": 3, **extra}


@dataclass
class Swarm:
    cluster: Cluster
    peer: ClientPeer
    observer: Observer
    gateways: dict[str, str]  # name -> peer id
    user: dict[str, str]
    limit: int

    @property
    def key(self) -> str:
        return self.user["api_key"]

    def pid(self, name: str) -> str:
        return self.cluster.peer_ids[name]


@contextlib.asynccontextmanager
async def swarm(tmp_path: Path, tables: dict[str, Any], *, limit: int,
                netns: bool | None = None,
                env: dict[str, dict[str, str]] | None = None) -> AsyncIterator[Swarm]:
    """Five daemons, a user with a key, every gateway seeing three workers.

    Limits count per clock hour: a scenario that would straddle the turn of
    the hour first waits for it, so its counts stay in one window."""
    left = WINDOW_SECONDS - time.time() % WINDOW_SECONDS
    if left < SCENARIO_SECONDS:
        await trio.sleep(left + 1)
    cluster = Cluster(tmp_path / "swarm", LAYOUT, tables, netns=netns, env=env)
    with cluster:
        try:
            await trio.to_thread.run_sync(cluster.start)
            observer = Observer(cluster)
            async with client_peer(observer.identity) as peer:
                ids = await connect_all(peer, [cluster.addr_of(g) for g in GATEWAYS])
                gateways = dict(zip(GATEWAYS, ids, strict=True))
                user = await register_user(peer.rpc, ids[0], "alice")
                s = Swarm(cluster, peer, observer, gateways, user, limit)
                for gw in ids:
                    await wait_workers(s, gw, 3)
                yield s
        except BaseException:
            print(cluster.logs())
            raise


async def wait_workers(s: Swarm, gateway: str, n: int, model: str = "fake") -> None:
    """Until ``gateway`` knows the key and lists ``n`` workers for ``model``."""
    with trio.fail_after(30):
        while True:
            try:
                listed = await s.peer.rpc.call(gateway, "listModels",
                                               {"auth": {"api_key": s.key}})
                if any(m["name"] == model and m["workers"] >= n for m in listed["models"]):
                    return
            except (errors.InvalidApiKey, errors.CallError):
                pass  # the key has not replicated yet, or the node is starting
            await trio.sleep(0.1)


async def health(s: Swarm, gateway: str) -> dict[str, Any]:
    with trio.fail_after(10):
        return dict(await s.peer.rpc.call(gateway, "getServiceHealth", {}))


async def settle(s: Swarm) -> None:
    """Until no gateway holds a ticket or unflushed usage, and every live
    node holds the same events."""
    with trio.fail_after(60):
        for gw in s.gateways.values():
            while True:
                h = await health(s, gw)
                if h["quota"]["tickets_held"] == 0 and h["usage_pending"] == 0 \
                        and h["in_flight"] == 0:
                    break
                await trio.sleep(0.1)
        live = [n for n in s.cluster.names if s.cluster.nodes[n].alive]
        peers = await connect_all(s.peer, [s.cluster.addr_of(n) for n in live])
        await s.observer.wait_converged(s.peer.rpc, peers)


async def load(s: Swarm, clients: int, per_client: int, *, tag: str,
               gateways: Sequence[str] = GATEWAYS, limit: float = 60.0) -> list[Outcome]:
    """``clients`` concurrent clients, each pinned to one gateway (round
    robin) asking ``per_client`` questions one after the other."""
    outcomes: list[Outcome] = []

    async def client(c: int) -> None:
        gw = s.gateways[gateways[c % len(gateways)]]
        for i in range(per_client):
            outcomes.append(await ask(s.peer.rpc, gw, s.key, f"{tag} client {c} question {i}",
                                      limit=limit))

    async with trio.open_nursery() as nursery:
        for c in range(clients):
            nursery.start_soon(client, c)
    return outcomes


async def hammer_to_limit(s: Swarm, counted_so_far: int,
                          tolerated: tuple[type[Exception], ...] = (), *,
                          slack: int = 0) -> list[Outcome]:
    """Ask through both gateways until the hourly limit refuses: exactly
    ``limit - counted_so_far`` more must be admitted (answered, or ended by
    a ``tolerated`` error); never more. ``slack``: requests a stopped
    gateway had been granted but never ran (the coordinator counted them,
    the ledger cannot), so that many fewer may be admitted."""
    left = s.limit - counted_so_far
    assert left > 0
    outcomes = await load(s, clients=20, per_client=(left + 30) // 20 + 1, tag="hammer")
    admitted = [o for o in outcomes if not isinstance(o.error, errors.LimitError)]
    refused = [o for o in outcomes if isinstance(o.error, errors.RateLimited)]
    assert all(o.ok or isinstance(o.error, tolerated) for o in admitted), \
        [(o.kind, o.gateway[-6:], o.error and o.error.message) for o in admitted if not o.ok][:5]
    # a coordinator change is the one way to overshoot: say if there was one
    failovers = {g: (await health(s, gw))["quota"]["coordinator_failovers"]
                 for g, gw in s.gateways.items() if s.cluster.nodes[g].alive}
    assert refused and all(o.error is not None and 0 < o.error.retry_after <= 3600
                           for o in refused), (len(admitted), left, failovers)
    assert left - slack <= len(admitted) <= left, (len(admitted), left, slack, failovers)
    return outcomes


def stop_and_read(s: Swarm) -> dict[str, Any]:
    codes = s.cluster.stop_all()
    assert all(code == 0 for code in codes.values()), codes
    return {n: read_ledger(s.cluster.nodes[n].db) for n in s.cluster.names}


def check_ledgers(s: Swarm, ledgers: dict[str, Any], outcomes: list[Outcome], *,
                  cut: set[str] = frozenset()) -> tuple[int, int]:  # type: ignore[assignment]
    """Same events everywhere, and each request's log row matches what its
    client saw. ``cut``: gateways killed in the scenario (their in-flight
    requests may or may not have been recorded). Returns (requests, tokens)
    counted in usage_stats."""
    first = ledgers[s.cluster.names[0]]
    for name, lf in ledgers.items():
        assert lf.integrity == "ok", name
        assert lf.held == 0, name
        assert lf.events == first.events, f"{name} differs from {s.cluster.names[0]}"
    merged = swarm_logs(ledgers.values())
    logs = merged.logs
    cut_ids = {s.gateways[g] for g in cut}
    for o in outcomes:
        rows = logs.get(request_hash(o.prompt), [])
        if o.ok:
            assert rows == [("success", o.tokens)], (o.prompt, rows)
        elif isinstance(o.error, errors.StreamInterrupted | errors.NoWorkerAvailable):
            assert rows == [("error", o.chunks)], (o.prompt, o.kind, rows)
        elif isinstance(o.error, errors.DeadlineExceeded):
            assert rows == [("timeout", o.chunks)], (o.prompt, rows)
        elif isinstance(o.error, errors.RateLimited):
            assert rows == [("rate_limited", 0)], (o.prompt, rows)
        elif isinstance(o.error, errors.PeerUnavailable | errors.StreamBroken
                        | errors.Cancelled) and o.gateway in cut_ids:
            # the gateway went down with the request: unrecorded (killed), or
            # recorded with at least the tokens that reached the client
            assert len(rows) <= 1, (o.prompt, rows)
            assert not rows or (rows[0][0] in ("success", "cancelled", "error")
                                and rows[0][1] >= o.chunks), (o.prompt, o.chunks, rows)
        else:
            raise AssertionError(f"unexpected outcome {o.kind}: {o.error!r}")
    expected = merged.logged[s.user["user_id"]]
    seen = sum(1 for o in outcomes for st, _ in logs.get(request_hash(o.prompt), [])
               if st != "rate_limited")
    assert seen == expected[0]  # no row the clients cannot account for
    for name, lf in ledgers.items():
        assert lf.usage_of(s.user["user_id"]) == expected, name
    return expected


def keep(name: str, s: Swarm, outcomes: list[Outcome], hammer: list[Outcome],
         usage: tuple[int, int], ledgers: dict[str, Any], **extra: Any) -> None:
    record(f"faults-{name}", {
        "namespaces": s.cluster.topology.namespaced,
        "outcomes": dict(Counter(o.kind for o in outcomes)),
        "hammer": dict(Counter(o.kind for o in hammer)),
        "usage_requests_tokens": list(usage),
        "events_per_node": {n: len(lf.events) for n, lf in ledgers.items()},
        "max_seconds": round(max((o.ended - o.started for o in outcomes), default=0), 2),
        **extra})


def counted(outcomes: list[Outcome]) -> int:
    return sum(1 for o in outcomes if not isinstance(o.error, errors.LimitError))


# -- the journal that makes a killed gateway's usage exact ------------------------------------
async def test_usage_journal_recovers_what_a_crash_did_not_flush(tmp_path: Path) -> None:
    """Unit level, on a real ledger file: records journalled but never flushed
    come back exactly once; records already flushed are not counted twice."""
    from p2pinfer.identity import Identity
    from p2pinfer.ledger import Ledger
    from p2pinfer.ledger.membership import admit, create_network

    owner = create_network(tmp_path, name="journal")
    me = Identity.load_or_create(tmp_path)
    ledger = Ledger.open(tmp_path / "node.db", me, owner.network, admit(owner, me.peer_id,
                                                                       ["gateway"]))
    journal = tmp_path / "node.db-usage"
    rec = UsageRecorder(ledger, journal=journal)
    user, key = str(uuid.uuid4()), str(uuid.uuid4())
    for i in range(3):
        rec.record(user_id=user, api_key_id=key, model="m", prompt_sha256=f"{i:064x}",
                   status="success", tokens=10, latency_ms=1.0)
    journalled = journal.read_bytes()
    assert journalled.count(b"\n") == 3
    assert rec.flush() > 0 and journal.read_bytes() == b""
    for i in range(3, 5):  # recorded, then the process dies before flushing
        rec.record(user_id=user, api_key_id=key, model="m", prompt_sha256=f"{i:064x}",
                   status="success", tokens=7, latency_ms=1.0)
    # a crash between a flush's commit and the truncation leaves flushed lines too
    journal.write_bytes(journalled + journal.read_bytes() + b'{"id": "torn')
    rec2 = UsageRecorder(ledger, journal=journal)
    assert rec2.recover() == 2
    rec2.flush()
    assert sum(r.request_count for r in ledger.usage(user_id=user)) == 5
    assert sum(r.tokens_used for r in ledger.usage(user_id=user)) == 3 * 10 + 2 * 7
    assert UsageRecorder(ledger, journal=journal).recover() == 0  # emptied by the flush
    assert journal.stat().st_mode & 0o777 == 0o600


async def test_usage_flushes_early_when_the_batch_is_full(tmp_path: Path) -> None:
    """A full batch is written at once rather than at the interval (a flush
    holds the event loop; big batches were a latency tail), and a store that
    fails is not retried in a busy loop."""
    from p2pinfer.identity import Identity
    from p2pinfer.ledger import Ledger
    from p2pinfer.ledger.membership import admit, create_network

    owner = create_network(tmp_path, name="early")
    me = Identity.load_or_create(tmp_path)
    ledger = Ledger.open(tmp_path / "node.db", me, owner.network, admit(owner, me.peer_id,
                                                                       ["gateway"]))
    rec = UsageRecorder(ledger, flush_interval=3600, flush_rows=10)
    user, key = str(uuid.uuid4()), str(uuid.uuid4())

    def record(n: int) -> None:
        for i in range(n):
            rec.record(user_id=user, api_key_id=key, model="m", prompt_sha256=f"{i:064x}",
                       status="success", tokens=1, latency_ms=1.0)

    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        record(9)
        await trio.sleep(0.2)
        assert rec.pending() == 9  # below flush_rows: waits for the interval
        record(1)
        with trio.fail_after(5):
            await rec.wait_flushed()
        assert sum(r.request_count for r in ledger.usage(user_id=user)) == 10
        # a failing store: retried at the interval, not on every record
        calls = 0

        def failing(items: Any) -> Any:
            nonlocal calls
            calls += 1
            raise errors.StorageError("disk full")

        real, ledger.append_many = ledger.append_many, failing
        record(30)
        await trio.sleep(0.3)
        # (the 30 records, and the key's use, held: it was written a moment ago)
        assert calls == 1 and rec.pending() == 30 + 1
        ledger.append_many = real
        nursery.cancel_scope.cancel()
    assert sum(r.request_count for r in ledger.usage(user_id=user)) == 40  # final flush


# -- scenarios --------------------------------------------------------------------------------
async def test_worker_killed_mid_stream(tmp_path: Path) -> None:
    """SIGKILL a worker while it streams answers: requests it had started end
    with StreamInterrupted, the others are served elsewhere; after it
    restarts, the ledger and usage are exact and the limit holds."""
    limit = 260
    tables = {"models": [synthetic(tokens=20, token_delay=0.05)],
              "gateway": gateway_table(limit)}
    with trio.fail_after(240):
        async with swarm(tmp_path, tables, limit=limit) as s:
            async with trio.open_nursery() as nursery:
                results: list[Outcome] = []

                async def run_load() -> None:
                    results.extend(await load(s, clients=40, per_client=3, tag="kill-worker"))

                nursery.start_soon(run_load)
                # wait until the victim is streaming, then kill it
                gw = s.gateways["g1"]

                async def busy() -> bool:
                    return bool((await health(s, gw))["in_flight"] >= 10)

                await wait_for(busy, limit=20)
                await trio.sleep(0.3)  # tokens are flowing (each answer takes 1 s)
                s.cluster.nodes["w1"].kill()
                killed_at = trio.current_time()
            kinds = Counter(o.kind for o in results)
            assert set(kinds) <= {"ok", "StreamInterrupted"}, kinds
            assert kinds["StreamInterrupted"] >= 1, kinds  # the kill did cut streams
            for o in results:
                if isinstance(o.error, errors.StreamInterrupted):
                    assert o.error.data["worker"] == s.pid("w1") and o.chunks >= 1
                elif o.started > killed_at:  # asked after the kill: a live worker
                    assert o.trailer is not None and o.trailer["worker"] != s.pid("w1")
            await trio.to_thread.run_sync(s.cluster.restart, "w1")
            await settle(s)
            hammer = await hammer_to_limit(s, counted(results))
            await settle(s)
            ledgers = await trio.to_thread.run_sync(stop_and_read, s)
    usage = check_ledgers(s, ledgers, results + hammer)
    keep("worker-killed", s, results, hammer, usage, ledgers)
    assert usage[0] == limit


async def test_gateway_killed_under_load(tmp_path: Path) -> None:
    """SIGKILL the gateway that coordinates the user's quota while clients
    stream through both: its clients get clear errors, the other gateway
    takes over the quota, and after the restart the usage of every request
    the dead gateway finished is in the ledger (its journal), exactly once."""
    limit = 400
    tables = {"models": [synthetic(tokens=10, token_delay=0.02)],
              # flushes 5 s apart: the victim dies with usage only in its journal
              "gateway": gateway_table(limit, usage_flush_interval=5.0)}
    with trio.fail_after(240):
        async with swarm(tmp_path, tables, limit=limit) as s:
            ids = list(s.gateways.values())
            victim = "g1" if rendezvous_order(s.user["user_id"], ids)[0] == ids[0] else "g2"
            journal = Path(f"{s.cluster.nodes[victim].db}-usage")
            results: list[Outcome] = []
            async with trio.open_nursery() as nursery:
                async def run_load() -> None:
                    results.extend(await load(s, clients=20, per_client=10, tag="kill-gw"))

                nursery.start_soon(run_load)
                async def both_busy() -> bool:
                    return min([(await health(s, g))["served"] for g in ids]) >= 20

                await wait_for(both_busy, limit=20)
                assert os.stat(journal).st_size > 0  # answered, not yet in the ledger
                s.cluster.nodes[victim].kill()
            kinds = Counter(o.kind for o in results)
            assert set(kinds) <= {"ok", "PeerUnavailable", "StreamBroken"}, kinds
            dead = s.gateways[victim]
            assert all(o.ok for o in results if o.gateway != dead), kinds  # failover
            assert kinds["StreamBroken"] + kinds["PeerUnavailable"] >= 1
            await trio.to_thread.run_sync(s.cluster.restart, victim)
            ready_at = trio.current_time()
            await connect_all(s.peer, [s.cluster.addr_of(victim)], limit=10)
            await settle(s)
            # the survivor routes quota to the restarted coordinator again once
            # its cool-down for it (set by its last failed call) is over
            await trio.sleep_until(ready_at + COORDINATOR_COOLDOWN + 0.5)
            hammer = await hammer_to_limit(s, await counted_in_ledger(s))
            await settle(s)
            ledgers = await trio.to_thread.run_sync(stop_and_read, s)
    usage = check_ledgers(s, ledgers, results + hammer, cut={victim})
    keep("gateway-killed", s, results, hammer, usage, ledgers)
    assert usage[0] == limit
    recovered = s.cluster.nodes[victim].log_tail(200_000).count("recovered the usage of")
    assert recovered == 1  # the journal, not luck, made it exact


async def counted_in_ledger(s: Swarm) -> int:
    """Admitted requests of the user so far, from a gateway's ledger copy
    (read through the user's own ``getUsage``)."""
    with trio.fail_after(10):
        usage = await s.peer.rpc.call(s.gateways["g1"], "getUsage",
                                      {"auth": {"api_key": s.key}})
    return sum(int(row["requests"]) for row in usage["usage"])


@pytest.mark.skipif(NETNS_SKIP is not None,
                    reason=f"a partition needs network namespaces: {NETNS_SKIP}")
async def test_worker_partitioned_then_healed(tmp_path: Path) -> None:
    """Take a worker's link down while it streams (packets vanish, nothing
    is closed): its streams end within the dead-link timeout, with
    StreamInterrupted or on another worker, instead of hanging for the
    ~15 minutes of TCP retransmissions; after the link comes back the worker
    serves again and catches up with the ledger."""
    from p2pinfer.rpc.host import TCP_DEAD_AFTER

    limit = 400
    tables = {"models": [synthetic(tokens=20, token_delay=0.05)],
              "gateway": gateway_table(limit)}
    with trio.fail_after(240):
        async with swarm(tmp_path, tables, limit=limit, netns=True) as s:
            w3 = s.cluster.index("w3")
            results: list[Outcome] = []
            async with trio.open_nursery() as nursery:
                async def run_load() -> None:
                    results.extend(await load(s, clients=30, per_client=4, tag="partition"))

                nursery.start_soon(run_load)

                async def busy() -> bool:
                    return min([(await health(s, g))["in_flight"]
                                for g in s.gateways.values()]) >= 5

                await wait_for(busy, limit=20)
                await trio.sleep(0.3)  # tokens are flowing everywhere
                s.cluster.topology.partition(w3)
                cut_at = trio.current_time()
            # the load finished while the worker was still cut off
            kinds = Counter(o.kind for o in results)
            assert set(kinds) <= {"ok", "StreamInterrupted"}, kinds
            assert kinds["StreamInterrupted"] >= 1, kinds  # streams were cut mid-way
            for o in results:
                if isinstance(o.error, errors.StreamInterrupted):
                    assert o.error.data["worker"] == s.pid("w3")
            assert max(o.ended for o in results) - cut_at < TCP_DEAD_AFTER + 10
            s.cluster.topology.heal(w3)

            async def w3_serves() -> bool:
                o = await ask(s.peer.rpc, s.gateways["g1"], s.key, f"after heal {len(results)}")
                results.append(o)
                assert o.ok, o.kind
                return bool(o.trailer is not None and o.trailer["worker"] == s.pid("w3"))

            await wait_for(w3_serves, limit=60, interval=0.2)
            await settle(s)
            hammer = await hammer_to_limit(s, counted(results))
            await settle(s)
            ledgers = await trio.to_thread.run_sync(stop_and_read, s)
    usage = check_ledgers(s, ledgers, results + hammer)
    keep("worker-partitioned", s, results, hammer, usage, ledgers)
    assert usage[0] == limit


async def test_slow_worker(tmp_path: Path) -> None:
    """One worker takes 3 s per answer, the others 0.1 s, and the gateway
    allows 1.5 s: load-aware routing sends it little; what it does get ends
    in a clear DeadlineExceeded with its ticket and slot returned."""
    limit = 400
    fast = {"models": [synthetic(tokens=10, token_delay=0.01)]}
    tables = {"gateway": gateway_table(limit, request_timeout=1.5), "w1": fast, "w2": fast,
              "w3": {"models": [synthetic(tokens=10, token_delay=0.3)]}}
    with trio.fail_after(240):
        async with swarm(tmp_path, tables, limit=limit) as s:
            results = await load(s, clients=30, per_client=5, tag="slow")
            kinds = Counter(o.kind for o in results)
            assert set(kinds) <= {"ok", "DeadlineExceeded"}, kinds
            assert kinds["DeadlineExceeded"] >= 1, kinds  # the slow worker was tried
            assert kinds["DeadlineExceeded"] <= len(results) // 4, kinds  # ...and avoided
            assert all(o.trailer is not None and o.trailer["worker"] != s.pid("w3")
                       for o in results if o.ok)
            for o in results:
                if not o.ok:
                    assert 1.4 < o.ended - o.started < 5
            await settle(s)

            async def slots_back() -> bool:  # every worker's descriptor: idle again
                listed = await s.peer.rpc.call(s.gateways["g2"], "listModels",
                                               {"auth": {"api_key": s.key}})
                model = listed["models"][0]
                return bool(model["free_slots"] == 3 * 4096 and model["queue_depth"] == 0)

            await wait_for(slots_back, limit=20)
            hammer = await hammer_to_limit(s, counted(results), (errors.DeadlineExceeded,))
            await settle(s)
            ledgers = await trio.to_thread.run_sync(stop_and_read, s)
    usage = check_ledgers(s, ledgers, results + hammer)
    keep("slow-worker", s, results, hammer, usage, ledgers)
    assert usage[0] == limit


@contextlib.contextmanager
def small_disk(path: Path, size: str = "4m") -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``path`` (needs root), unmounted on exit."""
    path.mkdir(parents=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(path)], capture_output=True, text=True, timeout=20)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip()[:200]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=20)


def fill(path: Path) -> Path:
    """Write zeros to ``path/filler`` until the file system is full."""
    filler = path / "filler"
    block = b"\0" * 65536
    # unbuffered: a buffered file would try to write its leftover bytes
    # again on close, and fail there with ENOSPC
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(block)
        except OSError:
            pass
    os.sync()
    return filler


async def test_gateway_whose_disk_is_full(tmp_path: Path) -> None:
    """A gateway's database lives on a 4 MB tmpfs that fills up: inference
    through it keeps working (usage waits in memory), writes that must be
    durable now fail with StorageError (a clear error) and the node keeps
    serving; once space is freed, everything it held reaches the ledger."""
    limit = 400
    with small_disk(tmp_path / "small") as disk:
        tables = {"models": [synthetic(tokens=10, token_delay=0.01)],
                  "gateway": gateway_table(limit),
                  "g2": {"node": {"database_url": f"sqlite:///{disk / 'node.db'}"}}}
        with trio.fail_after(240):
            async with swarm(tmp_path, tables, limit=limit) as s:
                warm = await load(s, clients=10, per_client=2, tag="before")
                await settle(s)
                filler = fill(disk)
                # Writes may still succeed for a while: the write-ahead log is
                # checkpointed every second and reuses its own space. Load the
                # gateway until its usage flush and a registration have both
                # been refused (each with StorageError, the node serving).
                g2 = s.gateways["g2"]
                results: list[Outcome] = []
                refused = None
                for i in range(8):  # at most 320 requests: the limit (400) must hold after
                    batch = await load(s, clients=10, per_client=4, tag=f"disk-full-{i}")
                    assert all(o.ok for o in batch), Counter(o.kind for o in batch)
                    results += batch
                    if refused is None:
                        try:
                            await s.peer.rpc.call(g2, "registerUser", {
                                "username": f"bob{i}", "email": f"bob{i}@example.com",
                                "password": "chaos harness password 7"})
                        except errors.StorageError as exc:
                            refused = exc
                    h = await health(s, g2)
                    if refused is not None and h["usage_flush_failures"] > 0:
                        break
                assert refused is not None, "registrations on a full disk all succeeded"
                h = await health(s, g2)
                assert h["usage_flush_failures"] > 0 and h["usage_pending"] > 0  # held
                assert s.cluster.nodes["g2"].alive
                filler.unlink()
                os.sync()
                await settle(s)
                hammer = await hammer_to_limit(s, counted(warm + results))
                await settle(s)
                ledgers = await trio.to_thread.run_sync(stop_and_read, s)
        log = s.cluster.nodes["g2"].log_tail(400_000)
        assert "writing usage to the ledger failed; will retry" in log
    usage = check_ledgers(s, ledgers, warm + results + hammer)
    keep("disk-full", s, warm + results, hammer, usage, ledgers)
    assert usage[0] == limit


async def test_gateway_restarted_under_load(tmp_path: Path) -> None:
    """SIGTERM a gateway while clients stream through it, then start it
    again: its clients get clear errors, it misses nothing written while it
    was down (a user registered meanwhile can use it at once), and usage
    stays exact."""
    limit = 400
    tables = {"models": [synthetic(tokens=10, token_delay=0.02)],
              "gateway": gateway_table(limit)}
    with trio.fail_after(240):
        async with swarm(tmp_path, tables, limit=limit) as s:
            results: list[Outcome] = []
            async with trio.open_nursery() as nursery:
                async def run_load() -> None:
                    results.extend(await load(s, clients=20, per_client=8, tag="restart"))

                nursery.start_soon(run_load)

                async def busy() -> bool:
                    return (await health(s, s.gateways["g2"]))["in_flight"] >= 5

                await wait_for(busy, limit=20)
                s.cluster.nodes["g2"].terminate()
            kinds = Counter(o.kind for o in results)
            assert set(kinds) <= {"ok", "PeerUnavailable", "StreamBroken", "Cancelled"}, kinds
            assert all(o.ok for o in results if o.gateway == s.gateways["g1"]), kinds
            assert s.cluster.nodes["g2"].stop() == 0  # a clean exit
            carol = await register_user(s.peer.rpc, s.gateways["g1"], "carol")
            await trio.to_thread.run_sync(s.cluster.restart, "g2")
            ready_at = trio.current_time()
            await connect_all(s.peer, [s.cluster.addr_of("g2")], limit=10)

            async def caught_up() -> bool:  # with what was written while it was down
                o = await ask(s.peer.rpc, s.gateways["g2"], carol["api_key"], "carol asks")
                assert o.ok or isinstance(o.error, errors.InvalidApiKey), o.kind
                return o.ok

            await wait_for(caught_up, limit=20, interval=0.2)
            await settle(s)
            # while g2 was away g1 coordinated alice's quota from its own copy;
            # once its cool-down for g2 is over it asks g2 again (see quota.py)
            await trio.sleep_until(ready_at + COORDINATOR_COOLDOWN + 0.5)
            cut = sum(1 for o in results if not o.ok)
            hammer = await hammer_to_limit(s, await counted_in_ledger(s), slack=cut)
            await settle(s)
            ledgers = await trio.to_thread.run_sync(stop_and_read, s)
    usage = check_ledgers(s, ledgers, results + hammer, cut={"g2"})
    keep("gateway-restarted", s, results, hammer, usage, ledgers, granted_never_ran=cut)
    assert limit - cut <= usage[0] <= limit
