"""Two connections between two member nodes: the one kept is the same on both
sides, and no answer streaming on the other is cut.

Real nodes on loopback: a hub (auth, gateway) and a worker streaming a
synthetic model's answer at a model's pace. While an answer streams on the
worker's connection to the hub, the hub dials the worker a second time (what
a restarted hub does while the worker redials it, seconds apart), which
py-libp2p's own reuse of a live connection never does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio
from libp2p.peer.id import ID

from p2pinfer.client import Client
from p2pinfer.identity import KEY_FILE, Identity
from p2pinfer.rpc.connections import dialled_here
from p2pinfer.swarm import LocalSwarm

from .helpers import wait_for

PASSWORD = "correct horse battery 9"
TABLES: dict[str, Any] = {
    "models": [{"name": "slow", "backend": "synthetic", "tokens": 200, "token_delay": 0.01,
                "aliases": ["default"]}],
    "auth": {"argon2_memory_kib": 1024, "argon2_time_cost": 1, "registration_wait": 0},
}


def peer_ids_in_order(base: Path, hub_smaller: bool) -> None:
    """Node keys for the swarm's homes such that the hub's peer id is the
    smaller (or the larger) of the two."""
    while True:
        hub = Identity.load_or_create(base / "hub")
        worker = Identity.load_or_create(base / "worker")
        if (hub.peer_id < worker.peer_id) == hub_smaller:
            return
        (base / "worker" / KEY_FILE).unlink()


def live(node: Any, peer_id: str) -> list[Any]:
    return list(node.connections.connections(peer_id))


async def a_second_connection(hub: Any, worker: Any) -> None:
    """The hub dials the worker although it holds a connection to it."""
    addr = multiaddr.Multiaddr(worker.addrs[0].split("/p2p/")[0])
    await hub.host.get_network().dial_addr(addr, ID.from_base58(worker.peer_id))


async def stream_all(client: Client, out: list[int]) -> None:
    async with client.stream(prompt="tell me a story", model="slow", max_tokens=200) as s:
        async for _ in s:
            pass
    assert s.response is not None
    out.append(int(s.response.usage["completion_tokens"]))


@pytest.mark.parametrize("hub_smaller", [True, False], ids=["first-retired", "second-closed"])
async def test_a_late_second_connection_cuts_no_answer(tmp_path: Path, hub_smaller: bool) -> None:
    """Both sides keep the connection the smaller peer id dialled. Here the
    worker dialled the first (the hub is its bootstrap peer) and the hub the
    second: with the hub's id the smaller, the first is retired while three
    answers stream on it and closed once they are done; with the worker's,
    the second is closed at once. The answers are whole either way."""
    layout = {"hub": ["auth", "gateway"], "worker": ["inference"]}
    peer_ids_in_order(tmp_path / "swarm", hub_smaller)
    with trio.fail_after(90):
        async with LocalSwarm(tmp_path / "swarm", layout, tables=TABLES) as swarm:
            hub, worker = swarm.first, swarm.nodes["worker"]
            async with Client(bootstrap=[hub.addrs[0]]) as client:
                await client.register("rita", "rita@example.org", PASSWORD)
                await client.login("rita", password=PASSWORD)
                key = (await client.create_api_key("k"))["api_key"]
            async with Client(bootstrap=[hub.addrs[0]], api_key=key) as client:
                await client.wait_for_model("slow")
                assert len(live(hub, worker.peer_id)) == 1
                done: list[int] = []
                async with trio.open_nursery() as streams:
                    for _ in range(3):
                        streams.start_soon(stream_all, client, done)
                    await trio.sleep(0.5)  # answers are streaming on the first connection
                    await a_second_connection(hub, worker)
                    await trio.sleep(0.5)
                    # the retired one stays while the answers stream on it
                    assert len(live(hub, worker.peer_id)) == (2 if hub_smaller else 1)
                assert done == [200, 200, 200]
                # then the retired one goes, and both sides keep the same one
                await wait_for(lambda: len(live(hub, worker.peer_id)) == 1
                               and len(live(worker, hub.peer_id)) == 1, limit=5)
                [on_hub], [on_worker] = live(hub, worker.peer_id), live(worker, hub.peer_id)
                assert dialled_here(on_hub) != dialled_here(on_worker)
                hub_dialled = dialled_here(on_hub)
                assert hub_dialled == (hub.peer_id < worker.peer_id)
                answer = await client.inference(prompt="again", model="slow", max_tokens=20)
                assert answer.usage["completion_tokens"] == 20
