"""Fairness under abuse: one user's streams that stop being read, or whose
client vanishes without a CANCEL, must not hold a worker's slots.

Real nodes on loopback: a hub (auth, gateway) and a worker with two slots
serving a synthetic model at a model's pace (long answers, a token every
10 ms). The abuser opens streams through the gateway from clients of its
own, reads one chunk and stops reading, or reads one chunk and closes its
libp2p host without cancelling anything. Another user keeps asking.
"""

from __future__ import annotations

import statistics
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import multiaddr
import trio

from p2pinfer import errors
from p2pinfer.client import Client
from p2pinfer.identity import Identity
from p2pinfer.rpc import RpcClient, make_host

from .helpers import wait_for

PASSWORD = "correct horse battery 9"
TABLES: dict[str, Any] = {
    "models": [{"name": "slow", "backend": "synthetic", "tokens": 3000, "token_delay": 0.01,
                "slots": 2, "max_queue": 100, "aliases": ["default"]}],
    "auth": {"argon2_memory_kib": 1024, "argon2_time_cost": 1, "registration_wait": 0},
    "gateway": {"default_rate_limit": 10_000, "concurrent_per_key": 16, "concurrent_per_user": 16},
    "node": {"announce_interval": 0.5, "descriptor_ttl": 0.5, "stall_timeout": 3.0},
}


async def api_key(hub: Any, name: str) -> str:
    async with Client(bootstrap=[hub.addrs[0]]) as client:
        await client.register(name, f"{name}@example.org", PASSWORD)
        await client.login(name, password=PASSWORD)
        return str((await client.create_api_key("k"))["api_key"])


@asynccontextmanager
async def abuser_host(hub: Any) -> AsyncIterator[tuple[Any, RpcClient]]:
    host = make_host(Identity.generate())
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        async with RpcClient.open(host) as rpc:
            await rpc.connect(hub.addrs[0])
            yield host, rpc


async def read_one_then(hub: Any, key: str, vanish: bool, *,
                        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """One abusive stream: the first chunk, then nothing (or a vanishing host)."""
    async with abuser_host(hub) as (host, rpc):
        stream = rpc.stream(hub.peer_id, "processInferenceRequest", {
            "request": {"prompt": "tell me everything", "max_tokens": 3000},
            "auth": {"api_key": key}})
        await stream.__aenter__()
        await stream.__anext__()
        task_status.started()
        if vanish:  # close the connection under it: no CANCEL frame
            await host.close()
            return
        await trio.sleep_forever()  # never read again, never cancel


def free_slots(worker: Any) -> int:
    status = worker.roles["inference"].engine.status("slow")
    return int(status["free_slots"])


async def victim_latency(client: Client) -> float:
    started = trio.current_time()
    answer = await client.inference(prompt="hello", model="slow", max_tokens=20)
    assert answer.usage["completion_tokens"] == 20
    return trio.current_time() - started


async def test_readers_that_stop_or_vanish_free_their_slots(tmp_path: Path,
                                                            nursery: trio.Nursery) -> None:
    """Four streams that stop being read and four whose client vanishes,
    two at a time on a two-slot worker, the abuser alone (so it may hold
    both slots): each pair's slots are free again within 5 s (a vanished
    client's at once, a stalled reader's after the stall timeout), and
    another user's latency is then at its baseline."""
    from p2pinfer.swarm import LocalSwarm

    layout = {"hub": ["auth", "gateway"], "worker": ["inference"]}
    with trio.fail_after(150):
        async with LocalSwarm(tmp_path / "swarm", layout, tables=TABLES) as swarm:
            hub, worker = swarm.first, swarm.nodes["worker"]
            abuser, victim = await api_key(hub, "mallory"), await api_key(hub, "victor")
            async with Client(bootstrap=[hub.addrs[0]], api_key=victim) as client:
                # the victim asks nothing before the abuse: a user who asked in
                # the last 30 s keeps a slot for itself (the next test), and
                # here the abuser is to hold both
                await client.wait_for_model("slow")
                freed: dict[str, list[float]] = {"stalled": [], "vanished": []}
                for vanish in (False, True, False, True):
                    async with trio.open_nursery() as abuse:
                        for _ in range(2):
                            await abuse.start(read_one_then, hub, abuser, vanish)
                        if not vanish:
                            assert free_slots(worker) == 0  # the two hold both slots
                        started = trio.current_time()
                        await wait_for(lambda: free_slots(worker) == 2, limit=5, interval=0.02)
                        freed["vanished" if vanish else "stalled"].append(
                            trio.current_time() - started)
                        abuse.cancel_scope.cancel()
                latencies = [await victim_latency(client) for _ in range(5)]
                baseline = statistics.median([await victim_latency(client) for _ in range(5)])
            assert max(freed["stalled"]) < 5.0 and max(freed["vanished"]) < 1.0, freed
            assert statistics.median(latencies) <= 2 * baseline, (latencies, baseline)


async def test_a_slow_but_steady_reader_is_not_cut_off(tmp_path: Path,
                                                       nursery: trio.Nursery) -> None:
    """A reader that takes 0.2 s per chunk (slower than the stall timeout
    allows for a whole window, faster than it for one chunk) reads its
    whole answer."""
    from p2pinfer.swarm import LocalSwarm

    tables = {**TABLES, "models": [{**TABLES["models"][0], "tokens": 60, "token_delay": 0.0}],
              "node": {**TABLES["node"], "stall_timeout": 1.0}}
    with trio.fail_after(120):
        async with LocalSwarm(tmp_path / "swarm", {"hub": ["auth", "gateway", "inference"]},
                              tables=tables) as swarm:
            key = await api_key(swarm.first, "sam")
            async with Client(bootstrap=[swarm.first.addrs[0]], api_key=key) as client:
                await client.wait_for_model("slow")
                parts = []
                try:
                    async with client.stream(prompt="hi", model="slow", max_tokens=60) as s:
                        async for text in s:
                            parts.append(text)
                            await trio.sleep(0.2)
                except errors.StreamStalled as exc:  # pragma: no cover - the failure
                    raise AssertionError(f"cut off after {len(parts)} chunks") from exc
                assert s.response is not None
                assert s.response.usage["completion_tokens"] == 60


async def test_a_user_flooding_a_worker_does_not_queue_others_behind_it(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """One user sends eight whole answers at once to a two-slot worker
    while allowed six in flight: two are refused (ConcurrencyLimited, scope
    user), one runs and five queue: the other slot is kept for the other
    user, who asked in the last 30 s. That user's request is served at once:
    within twice its baseline (first come, first served made it wait for
    four flood answers: 3.3 s against a 0.2 s baseline)."""
    from p2pinfer.swarm import LocalSwarm

    tables = {**TABLES, "gateway": {**TABLES["gateway"], "concurrent_per_user": 6}}
    layout = {"hub": ["auth", "gateway"], "worker": ["inference"]}
    with trio.fail_after(150):
        async with LocalSwarm(tmp_path / "swarm", layout, tables=tables) as swarm:
            hub, worker = swarm.first, swarm.nodes["worker"]
            keys = {name: await api_key(hub, name) for name in ("flood", "victor")}
            async with Client(bootstrap=[hub.addrs[0]], api_key=keys["flood"]) as flood, \
                    Client(bootstrap=[hub.addrs[0]], api_key=keys["victor"]) as client:
                await client.wait_for_model("slow")
                baseline = statistics.median([await victim_latency(client) for _ in range(3)])
                started = trio.current_time()
                await flood.inference(prompt="long", model="slow", max_tokens=100)
                one_flood = trio.current_time() - started
                outcomes: list[str] = []

                async def flood_one() -> None:
                    try:
                        await flood.inference(prompt="long", model="slow", max_tokens=100)
                        outcomes.append("ok")
                    except errors.ConcurrencyLimited as exc:
                        assert exc.data["scope"] == "user"
                        outcomes.append("limited")

                async with trio.open_nursery() as floods:
                    for _ in range(8):
                        floods.start_soon(flood_one)
                    # one runs, five wait: the second slot is kept for the
                    # victim, who asked in the last 30 s
                    await wait_for(lambda: worker.roles["inference"].engine.status("slow")[
                        "queue_depth"] == 5, limit=10, interval=0.01)
                    victim = await victim_latency(client)
                assert sorted(outcomes) == ["limited"] * 2 + ["ok"] * 6, outcomes
    assert victim <= 2 * baseline, (victim, baseline, one_flood)



async def test_another_users_latency_holds_while_streams_stall_and_vanish(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """The abuse of the first test, all eight streams at once, against a
    user who is asking too: a slot stays kept for that user, whose
    latency stays within 2x its baseline while the abuse goes on; all the
    abuser's streams are gone from the worker soon after."""
    from p2pinfer.swarm import LocalSwarm

    layout = {"hub": ["auth", "gateway"], "worker": ["inference"]}
    with trio.fail_after(150):
        async with LocalSwarm(tmp_path / "swarm", layout, tables=TABLES) as swarm:
            hub, worker = swarm.first, swarm.nodes["worker"]
            abuser, victim = await api_key(hub, "mallory"), await api_key(hub, "victor")
            async with Client(bootstrap=[hub.addrs[0]], api_key=victim) as client:
                await client.wait_for_model("slow")
                baseline = statistics.median([await victim_latency(client) for _ in range(5)])
                during: list[float] = []
                async with trio.open_nursery() as abuse:
                    for vanish in (False, True) * 4:
                        abuse.start_soon(read_one_then, hub, abuser, vanish)
                    await wait_for(lambda: free_slots(worker) < 2, limit=10, interval=0.02)
                    for _ in range(5):
                        during.append(await victim_latency(client))
                    await wait_for(lambda: free_slots(worker) == 2 and worker.roles[
                        "inference"].engine.status("slow")["queue_depth"] == 0,
                        limit=40, interval=0.05)
                    abuse.cancel_scope.cancel()
    # the median, as in the first test: one request in five may meet the
    # abusers' eight connections being set up (0.40 s against 0.20 s once
    # in CI); none waits for a stalled stream (3 s)
    assert statistics.median(during) <= 2 * baseline, (during, baseline)
    assert max(during) < 1.0, (during, baseline)
