"""Role and model discovery through the DHT, with real nodes on loopback."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio

from p2pinfer import errors
from p2pinfer.discovery import Descriptor, topic_key
from p2pinfer.identity import Identity
from p2pinfer.node import Node

from .helpers import make_network, node_config, run_nodes, wait_for


class ProbeRole:
    """A minimal role: serves nothing but announces itself (and models)."""

    def __init__(self, node: Node, name: str, models: list[str]) -> None:
        self.name = name
        self.models = models

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    def describe(self) -> dict[str, Any]:
        return {"models": [{"name": m} for m in self.models]}

    def topics(self) -> list[str]:
        return [f"model/{m}" for m in self.models]


def factories(models: list[str]) -> dict[str, Any]:
    return {
        "inference": lambda node: ProbeRole(node, "inference", models),
        "gateway": lambda node: ProbeRole(node, "gateway", []),
        "auth": lambda node: ProbeRole(node, "auth", []),
    }


def test_topic_keys_are_namespaced() -> None:
    assert topic_key("net-a", "role/gateway") != topic_key("net-b", "role/gateway")
    assert topic_key("n", "x").startswith("1220") and len(topic_key("n", "x")) == 68


def test_descriptor_signature_and_freshness() -> None:
    ident = Identity.generate()
    desc = Descriptor.create(ident, addrs=["/ip4/127.0.0.1/tcp/1"], roles=["gateway"],
                             topics=["role/gateway"], info={"k": 1}, network="n")
    assert Descriptor.from_wire(desc.to_wire()) == desc
    tampered = {**desc.to_wire(), "roles": ["gateway", "auth"]}
    with pytest.raises(errors.InvalidParams, match="signature"):
        Descriptor.from_wire(tampered)
    with pytest.raises(errors.InvalidParams, match="stale"):
        Descriptor.from_wire(desc.to_wire(), now=time.time() + 3600)
    with pytest.raises(errors.InvalidParams):
        Descriptor.from_wire({"peer_id": 1})


async def test_five_nodes_find_roles_and_models(tmp_path: Any, nursery: trio.Nursery) -> None:
    plan = [
        ("boot", ["auth"], []),
        ("g1", ["gateway"], []),
        ("w1", ["inference"], ["smollm2", "llama3"]),
        ("w2", ["inference"], ["smollm2"]),
        ("g2", ["gateway", "inference"], ["tiny"]),
    ]
    homes = make_network(tmp_path, [name for name, _, _ in plan])
    with trio.fail_after(60):
        boot_cfg = node_config(homes[0], roles=plan[0][1], announce_interval=1.0,
                               descriptor_ttl=1.0)
        async with run_nodes(nursery, [boot_cfg], role_factories=factories([])) as (boot,):
            bootstrap = [boot.addrs[0]]
            others = []
            for home, (_, roles, models) in zip(homes[1:], plan[1:], strict=True):
                cfg = node_config(home, roles=roles, bootstrap=bootstrap,
                                  announce_interval=1.0, descriptor_ttl=1.0)
                node = Node(cfg, role_factories=factories(models))
                await nursery.start(node.run)
                others.append(node)
            g1, w1, w2, g2 = others
            nodes = [boot, *others]

            def peers(descs: list[Descriptor]) -> set[str]:
                return {d.peer_id for d in descs}

            async def sees(node: Node, topic: str, expected: set[str]) -> bool:
                return peers(await node.discovery.find(topic)) == expected

            # every node finds every gateway and every worker of a model
            for node in nodes:
                await wait_for(lambda n=node: sees(n, "role/gateway", {g1.peer_id, g2.peer_id}),
                               limit=20)
                await wait_for(lambda n=node: sees(n, "model/smollm2", {w1.peer_id, w2.peer_id}),
                               limit=20)
            found = await g1.discovery.find_model("llama3")
            assert peers(found) == {w1.peer_id}
            assert found[0].models() == [{"name": "smollm2"}, {"name": "llama3"}]
            assert found[0].addrs and all("/p2p/" in a for a in found[0].addrs)

            # a node that leaves stops being listed
            w2.stop()
            await wait_for(lambda: sees(g1, "model/smollm2", {w1.peer_id}), limit=10)
            await wait_for(lambda: sees(boot, "model/smollm2", {w1.peer_id}), limit=10)
            for node in (boot, g1, w1, g2):
                node.stop()


async def test_find_peers_rpc_rules(tmp_path: Any, nursery: trio.Nursery) -> None:
    """Non-members may look up entry points only; bad params are rejected."""
    from p2pinfer.rpc import RpcClient, make_host

    cfg = node_config(tmp_path / "n", roles=["gateway"])
    async with run_nodes(nursery, [cfg], role_factories=factories([])) as (node,):
        stranger = make_host(Identity.generate())
        import multiaddr

        async with stranger.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            async with RpcClient.open(stranger) as client:
                with trio.fail_after(15):
                    peer = await client.connect(node.addrs[0])
                    ping = await client.call(peer, "ping")
                    assert ping["member"] is False and ping["peer_id"] == node.peer_id
                    got = await client.call(peer, "findPeers", {"role": "gateway"})
                    assert [Descriptor.from_wire(d).peer_id for d in got] == [node.peer_id]
                    with pytest.raises(errors.NotMember):
                        await client.call(peer, "findPeers", {"role": "auth"})
                    with pytest.raises(errors.NotMember):
                        await client.call(peer, "findPeers", {"model": "x"})
                    for bad in (None, {}, {"role": "wizard"}, {"role": 1}, {"x": 1},
                                {"role": "gateway", "model": "m"}):
                        with pytest.raises(errors.InvalidParams):
                            await client.call(peer, "findPeers", bad)
        # a node calls its own methods in-process (a gateway routing to itself)
        with trio.fail_after(5):
            assert (await node.rpc.call(node.peer_id, "ping"))["member"] is True
            async with node.rpc.stream(node.peer_id, "noSuchStream") as s:
                with pytest.raises(errors.UnknownMethod):
                    async for _ in s:
                        pass
        node.stop()
