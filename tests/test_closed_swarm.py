"""A closed swarm: what a non-member, or a removed node, can *receive*.

Each test plays the attacker with real parts: a node of the project's own
code that claims the swarm's network id and provides the gateway role on the
DHT, a plain py-libp2p host that subscribes to the ledger's GossipSub topic,
and a node the owner removed. The doors (member-only RPC methods) were
tested before; these tests look at the layers under them: DHT results,
descriptors, the SDK's and the CLI's choice of gateway, pubsub streams and
subscriptions, and connections of removed nodes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pinfer import errors
from p2pinfer.client import Client
from p2pinfer.identity import Identity

from .helpers import make_network, node_config, run_network, wait_for

HUB_ROLES = ["auth", "gateway", "metrics"]
PASSWORD = "correct horse battery 9"
FAST = {"argon2_memory_kib": 1024, "argon2_time_cost": 1, "registration_wait": 0}
TABLES: dict[str, Any] = {
    "models": [{"name": "fake", "backend": "synthetic", "tokens": 4, "aliases": ["default"]}],
    "auth": FAST,
    "gateway": {"default_rate_limit": 10_000},
    "node": {"announce_interval": 0.5, "descriptor_ttl": 0.5},
}


def refused(node: Any, layer: str, reason: str) -> float:
    value = node.registry.get_sample_value("ai_platform_access_refused_total",
                                           {"layer": layer, "reason": reason})
    return float(value or 0.0)


def impostor_class(network_id: str) -> type[Any]:
    """A node of its own network (so it holds no certificate of ours) that
    claims ``network_id`` in its descriptor and DHT topics: what anyone can
    build from this project's code."""
    from p2pinfer.node import Node

    class Impostor(Node):
        @property
        def network_id(self) -> str:
            return network_id

    return Impostor


@asynccontextmanager
async def swarm_with_impostor(tmp_path: Path, nursery: trio.Nursery
                              ) -> AsyncIterator[tuple[Any, Any, list[str]]]:
    """A hub (auth, gateway, metrics) and a worker of one network, and an
    impostor gateway bootstrapped to the hub, announcing itself under the
    hub's network. Yields (hub, impostor, the methods the impostor served)."""
    from p2pinfer.swarm import LocalSwarm

    layout = {"hub": HUB_ROLES, "worker": ["inference"]}
    async with LocalSwarm(tmp_path / "swarm", layout, tables=TABLES) as swarm:
        hub = swarm.first
        rogue_home = tmp_path / "rogue"
        impostor = impostor_class(hub.network_id)(node_config(
            rogue_home, roles=["gateway"], bootstrap=[hub.addrs[0]],
            announce_interval=0.5, tables={"gateway": {"default_rate_limit": 10_000}}))
        served: list[str] = []
        impostor.rpc_server.observers.append(lambda method, status, s: served.append(method))
        await nursery.start(impostor.run)
        # the impostor is on the DHT under the hub's network before we look
        from p2pinfer.discovery import topic_key

        async def provided() -> bool:
            with trio.move_on_after(2):
                found = await hub.discovery.dht.find_providers(
                    topic_key(hub.network_id, "role/gateway"))
                return any(p.peer_id.to_base58() == impostor.peer_id for p in found)
            return False

        await wait_for(provided, limit=20)
        try:
            yield hub, impostor, served
        finally:
            impostor.stop()


async def api_key_of(hub: Any) -> str:
    async with Client(bootstrap=[hub.addrs[0]]) as client:
        await client.register("carol", "carol@example.org", PASSWORD)
        await client.login("carol", password=PASSWORD)
        return str((await client.create_api_key("ci"))["api_key"])


async def test_a_non_member_posing_as_a_gateway_gets_no_request(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(180):
        async with swarm_with_impostor(tmp_path, nursery) as (hub, impostor, served):
            key = await api_key_of(hub)
            # the hub's public findPeers no longer offers it
            async with Client(bootstrap=[hub.addrs[0]], api_key=key) as client:
                assert impostor.peer_id not in {d.peer_id for d in await client.find("gateway")}
            assert refused(hub, "discovery", "not_member") >= 1
            workers: set[str] = set()
            # 45 requests through the hub alone, 45 with the impostor as a
            # second bootstrap address (its descriptor offers the gateway role
            # itself: the SDK checks its certificate and does not use it)
            for bootstrap in ([hub.addrs[0]], [impostor.addrs[0], hub.addrs[0]]):
                async with Client(bootstrap=bootstrap, api_key=key) as client:
                    for _ in range(45):
                        answer = await client.inference(prompt="hello", model="fake")
                        assert answer.usage["completion_tokens"] == 4
                        workers.add(str(answer.worker))
                    if impostor.addrs[0] in bootstrap:
                        assert impostor.peer_id in client.untrusted
            # 10 runs of the CLI, as a user types it
            env = {**os.environ, "P2PINFER_CONFIG_DIR": str(tmp_path / "cli"),
                   "P2PINFER_API_KEY": key}
            for _ in range(10):
                done = await trio.run_process(
                    [str(Path(sys.executable).parent / "p2pinfer"), "prompt", "-m", "fake",
                     "--bootstrap", impostor.addrs[0], "--bootstrap", hub.addrs[0], "hello"],
                    env=env, capture_stdout=True, capture_stderr=True, check=False)
                assert done.returncode == 0, done.stderr.decode()[-2000:]
            assert "processInferenceRequest" not in served, served
            assert len(workers) == 1


async def test_the_sdk_refuses_a_swarm_that_cannot_show_a_certificate(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(120):
        async with swarm_with_impostor(tmp_path, nursery) as (hub, impostor, served):
            # the impostor as the only way in: nothing is sent to it
            async with Client(bootstrap=[impostor.addrs[0]], api_key="p2p_stolen") as client:
                with pytest.raises(errors.UntrustedPeer):
                    await client.inference(prompt="hello")
            # a pinned network that the bootstrap node is not in
            other = "p2p-" + "a" * 26
            async with Client(bootstrap=[hub.addrs[0]], api_key="p2p_x",
                              network=other) as client:
                with pytest.raises(errors.UntrustedPeer, match=other):
                    await client.inference(prompt="hello")
            assert "processInferenceRequest" not in served


# -- the ledger's topic -----------------------------------------------------------------
@asynccontextmanager
async def eavesdropper(identity: Identity, topic: str, target: str
                       ) -> AsyncIterator[list[bytes]]:
    """A plain py-libp2p host (Noise, yamux) that subscribes to ``topic``,
    dials ``target`` and collects every message it is sent."""
    import multiaddr
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
    from libp2p.pubsub.pubsub import Pubsub
    from libp2p.tools.anyio_service import background_trio_service

    from p2pinfer.rpc import make_host
    from p2pinfer.rpc.host import parse_multiaddr

    host = make_host(identity)
    got: list[bytes] = []
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        router = GossipSub(protocols=[PROTOCOL_ID_V11], degree=3, degree_low=2, degree_high=6,
                           heartbeat_interval=1, spam_protection_enabled=False)
        pubsub = Pubsub(host, router, strict_signing=True)
        async with background_trio_service(pubsub), background_trio_service(router):
            await pubsub.wait_until_ready()
            subscription = await pubsub.subscribe(topic)

            async def read() -> None:
                while True:
                    got.append((await subscription.get()).data)

            async with trio.open_nursery() as inner:
                inner.start_soon(read)
                from libp2p.peer.peerinfo import info_from_p2p_addr

                await host.connect(info_from_p2p_addr(parse_multiaddr(target)))
                yield got
                inner.cancel_scope.cancel()


async def test_a_non_member_and_a_removed_node_receive_no_ledger_event(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    from p2pinfer.ledger.gossip import topic_for
    from p2pinfer.ledger.membership import load_owner

    homes = make_network(tmp_path, 5, roles=[["auth"]] * 5)
    owner = load_owner(homes[0])
    assert owner is not None
    with trio.fail_after(150):
        async with run_network(nursery, homes, roles=["auth"], tables={"auth": FAST}) as nodes:
            hub, doomed = nodes[0], nodes[4]
            topic = topic_for(hub.network_id)
            await wait_for(lambda: all(len(n.connected_peers()) >= 1 for n in nodes))
            # the owner removes a member: every node closes its connections
            await wait_for(lambda: len(doomed.connected_peers()) >= 1)
            hub.ledger.remove_member(owner, doomed.peer_id)
            started = trio.current_time()
            await wait_for(lambda: all(doomed.peer_id not in n.connected_peers()
                                       for n in nodes[:4]), limit=5, interval=0.01)
            closed_after = trio.current_time() - started
            assert closed_after < 1.0, closed_after
            await wait_for(lambda: doomed.removed, limit=5)
            assert refused(hub, "connection", "removed") >= 1
            # a stranger, and the removed node's key in a modified program,
            # each subscribe to the ledger's topic through a member
            async with eavesdropper(Identity.generate(), topic, hub.addrs[0]) as stranger, \
                    eavesdropper(doomed.identity, topic, nodes[1].addrs[0]) as removed:
                for i in range(50):
                    hub.ledger.append("user.registered", {
                        "user_id": str(uuid.uuid4()), "username": f"user{i}",
                        "email": f"user{i}@example.org", "password_hash": "h",
                        "created_at": time.time()})
                # the members have them all; the two listeners got nothing
                await wait_for(lambda: all(n.ledger.user_by_username("user49")
                                           for n in nodes[:4]), limit=30)
                await trio.sleep(1.5)  # a gossip heartbeat and more
                assert stranger == [] and removed == []
            # the stranger's pubsub stream was refused once its grace period ended
            await wait_for(lambda: refused(hub, "pubsub", "not_member") >= 1, limit=10)
            # and neither may pull the ledger
            async with Client(bootstrap=[hub.addrs[0]]) as client:
                peer = (await client._entry_points()).popitem()[0]
                for method in ("ledgerSync", "ledgerPull", "ledgerCheckpoint"):
                    with pytest.raises(errors.NotMember):
                        await client._rpc.call(peer, method, {"vv": {}})


def test_a_removed_node_says_so_and_does_not_start(tmp_path: Path) -> None:
    """After its removal the node's own ledger holds the removal: starting
    it again fails with a message that says why."""
    from p2pinfer.ledger import Ledger
    from p2pinfer.ledger.membership import load_member_cert, load_network, load_owner

    homes = make_network(tmp_path, 2, roles=[["auth"], ["inference"]])
    owner = load_owner(homes[0])
    assert owner is not None
    me = Identity.load_or_create(homes[1])
    network, cert = load_network(homes[1]), load_member_cert(homes[1])
    assert network is not None and cert is not None
    ledger = Ledger.open(homes[1] / "node.db", me, network, cert)
    from p2pinfer.ledger.membership import make_removal

    ledger.store.absorb_docs([make_removal(owner, me.peer_id, 0).to_wire()], source="test")
    ledger.close()
    done = subprocess.run(
        [sys.executable, "-m", "p2pinfer.daemon", "--home", str(homes[1]), "--roles",
         "inference", "--listen", "/ip4/127.0.0.1/tcp/0"], capture_output=True, text=True,
        timeout=60)
    assert done.returncode != 0
    assert "was removed from network" in done.stderr + done.stdout
