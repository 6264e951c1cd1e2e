"""Self-healing: ordinary events heal by themselves.

The node restarted here is the one every other node bootstrapped from (the
hub: the only auth and gateway node), the case the chaos harness, whose hub
bootstraps from another node, never saw.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import trio

from p2pinfer.client import Client
from p2pinfer.node import Node

from .helpers import make_network, node_config, run_nodes, wait_for

FAST = {"argon2_memory_kib": 1024, "argon2_time_cost": 1, "registration_wait": 0}
MODEL = {"models": [{"name": "fake", "backend": "synthetic", "tokens": 4,
                     "aliases": ["default"]}]}
# The defaults (announce every 30 s): a worker's periodic DHT announcement
# would also find the hub again, after up to 30 s; the test must not pass
# on that.
NODE: dict[str, Any] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def workers_seen(hub: Any) -> int:
    models = {m["name"]: m["workers"] for m in await hub.roles["gateway"].swarm_models()}
    return int(models.get("fake", 0))


async def test_workers_come_back_to_a_restarted_hub_within_10_s(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    homes = make_network(tmp_path, ["hub", "w1", "w2"],
                         roles=[["auth", "gateway"], ["inference"], ["inference"]])
    port = free_port()
    listen = [f"/ip4/127.0.0.1/tcp/{port}"]

    def hub_config() -> Any:
        return node_config(homes[0], roles=["auth", "gateway"], listen=listen,
                           tables={"auth": FAST}, **NODE)

    with trio.fail_after(120):
        hub = Node(hub_config())
        await nursery.start(hub.run)
        boot = hub.addrs[0]
        workers = [node_config(h, roles=["inference"], bootstrap=[boot], tables=MODEL, **NODE)
                   for h in homes[1:]]
        async with run_nodes(nursery, workers) as (w1, w2):
            await wait_for(lambda: workers_seen(hub), limit=30)
            await wait_for(lambda: _eq(workers_seen(hub), 2), limit=30)
            async with Client(bootstrap=[boot]) as client:
                await client.register("rita", "rita@example.org", "correct horse battery 9")
                await client.login("rita", password="correct horse battery 9")
                key = (await client.create_api_key("k"))["api_key"]
            hub_id = hub.peer_id
            for round_ in range(2):
                hub.stop()
                await wait_for(lambda: hub_id not in w1.connected_peers()
                               and hub_id not in w2.connected_peers(), limit=10)
                await trio.sleep(1.0)  # the hub stays away a moment
                hub = again = Node(hub_config())
                await nursery.start(again.run)
                serving = trio.current_time()
                await wait_for(lambda n=again: _eq(workers_seen(n), 2), limit=10, interval=0.1)
                back = trio.current_time() - serving
                assert back < 10, (round_, back)
                async with Client(bootstrap=[boot], api_key=key) as client:
                    answer = await client.inference(prompt="hello", model="fake")
                    assert answer.usage["completion_tokens"] == 4
        hub.stop()


async def _eq(value: Any, expected: int) -> bool:
    return bool(await value == expected)


async def test_clients_that_came_and_went_are_not_dialled(tmp_path: Path,
                                                          nursery: trio.Nursery) -> None:
    """A thousand short-lived clients (each its own libp2p host and key, as
    each CLI run is) connect to the hub, ask and leave. Once they have
    left, the hub dials none of them: its failed dials stay flat over
    several announcement rounds (py-libp2p's DHT used to fall back on every
    peer it had ever seen, about 150 failed dials per round after 100
    clients, for ever)."""
    homes = make_network(tmp_path, ["hub", "w"], roles=[["auth", "gateway"], ["inference"]])
    hub_cfg = node_config(homes[0], roles=["auth", "gateway"], announce_interval=1.0,
                          tables={"auth": FAST})
    with trio.fail_after(240):
        async with run_nodes(nursery, [hub_cfg]) as (hub,):
            w_cfg = node_config(homes[1], roles=["inference"], bootstrap=[hub.addrs[0]],
                                announce_interval=1.0, tables=MODEL)
            async with run_nodes(nursery, [w_cfg]):
                await wait_for(lambda: workers_seen(hub), limit=20)

                def failed() -> float:
                    return float(hub.metrics.dials.labels("failed")._value.get())

                async def one() -> None:
                    async with Client(bootstrap=[hub.addrs[0]]) as client:
                        await client.health()

                limiter = trio.CapacityLimiter(16)

                async def guarded() -> None:
                    async with limiter:
                        await one()

                async with trio.open_nursery() as clients:
                    for _ in range(1000):
                        clients.start_soon(guarded)
                await trio.sleep(3)  # dials to clients caught leaving end
                before = failed()
                await trio.sleep(5)  # five announcement rounds
                after = failed()
                peers = len(hub.host.get_peerstore().peer_ids())
    assert after == before, (before, after)
    assert peers <= 3, peers  # itself, the worker (and nobody else)
