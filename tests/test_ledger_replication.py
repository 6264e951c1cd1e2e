"""Replication between real nodes on loopback: gossip, anti-entropy, catch-up,
membership changes and rejections over the network."""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio
import trio.lowlevel

from p2pinfer import errors
from p2pinfer.identity import Identity
from p2pinfer.ledger import load_owner
from p2pinfer.ledger.events import sign_event
from p2pinfer.ledger.membership import import_join_token
from p2pinfer.node import Node
from p2pinfer.rpc import RpcClient, make_host
from p2pinfer.wire import canonical_pack, unpack

from .helpers import make_network, node_config, run_network, wait_for

LEDGER = {"ledger": {"sync_interval": 1.0}}


def audit(i: int) -> dict[str, Any]:
    return {"actor": f"tester-{i}", "action": "test", "outcome": "ok", "time": time.time()}


def register(name: str) -> dict[str, Any]:
    return {"user_id": str(uuid.uuid4()), "username": name, "email": f"{name}@example.org",
            "password_hash": "h", "created_at": time.time()}


async def converge(nodes: list[Node]) -> None:
    """Wait until every node has applied everything any node has."""
    union: dict[str, int] = {}
    for node in nodes:
        for author, seq in node.ledger.version_vector().items():
            union[author] = max(union.get(author, 0), seq)
    for node in nodes:
        await node.ledger.wait_for_version(union)


async def test_five_nodes_apply_each_others_events(tmp_path: Path,
                                                   nursery: trio.Nursery) -> None:
    roles = [["auth"], ["gateway"], ["auth", "gateway"], ["inference"], ["auth"]]
    homes = make_network(tmp_path, 5, roles=roles)
    with trio.fail_after(60):
        async with run_network(nursery, homes, tables=LEDGER) as nodes:
            ledgers = [n.ledger for n in nodes]
            assert len({lg.network_id for lg in ledgers}) == 1
            ev = ledgers[4].append("user.registered", register("alice"))
            for lg in ledgers:
                await lg.wait_for_event(ev.author, ev.seq)
                user = lg.user_by_username("alice")
                assert user is not None and user.id == ev.body["user_id"]
            # concurrent writers of every role, then identical tables everywhere
            for i in range(20):
                ledgers[0].append("audit", audit(i))
                ledgers[2].append("usage", {"entries": [
                    {"user_id": ev.body["user_id"], "key_id": None,
                     "hour": int(time.time()) // 3600 * 3600, "requests": 1, "tokens": i}]})
                ledgers[4].append("session.revoked", {"jti": f"j{i}", "exp": time.time() + 60})
            await converge(nodes)
            snapshots = [lg.store.snapshot() for lg in ledgers]
            assert all(s == snapshots[0] for s in snapshots[1:])
            assert ledgers[3].usage(user_id=ev.body["user_id"])[0].tokens_used == sum(range(20))
            # the inference-only node may not write users: refused locally
            with pytest.raises(errors.KindNotAllowed):
                ledgers[3].append("user.registered", register("mallory"))
            for node in nodes:
                node.stop()


async def test_anti_entropy_alone_converges(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Gossip is only a hint: with it switched off, sync rounds deliver everything."""
    homes = make_network(tmp_path, 3, roles=[["auth", "gateway"]] * 3)
    tables = {"ledger": {"gossip": False, "sync_interval": 0.2}}
    with trio.fail_after(60):
        async with run_network(nursery, homes, tables=tables) as nodes:
            assert all(n.ledger.gossip is None for n in nodes)
            for i in range(100):
                nodes[i % 3].ledger.append("audit", audit(i))
            await converge(nodes)
            assert all(n.ledger.store.count_events() == nodes[0].ledger.store.count_events()
                       for n in nodes)
            applied = nodes[1].ledger.metrics.registry.get_sample_value(
                "ai_platform_ledger_events_applied_total", {"kind": "audit", "source": "sync"})
            assert applied is not None and applied >= 66
            for node in nodes:
                node.stop()


async def test_rejections_over_gossip_change_nothing(tmp_path: Path,
                                                     nursery: trio.Nursery) -> None:
    homes = make_network(tmp_path, 3, roles=[["auth"], ["gateway"], ["auth"]])
    with trio.fail_after(60):
        async with run_network(nursery, homes, tables=LEDGER) as nodes:
            a0, g1, a2 = (n.ledger for n in nodes)
            await converge(nodes)
            await a0.wait_until(lambda: a0.is_member(g1.peer_id) and a0.is_member(a2.peer_id))
            await g1.wait_until(lambda: g1.is_member(a0.peer_id))
            before = a0.store.snapshot()
            good = sign_event(nodes[1].identity, g1.network_id, g1.store.heads[g1.peer_id] + 1,
                              g1.store.clock.now(), "user.registered", register("gw"))
            fields = unpack(good.raw)
            forged = canonical_pack([*fields[:6], {**fields[6], "username": "root"}, fields[7]])
            outsider = Identity.generate()
            stranger = sign_event(outsider, g1.network_id, 1, good.hlc, "audit", audit(0)).raw
            other_net = sign_event(nodes[1].identity, "p2p-elsewhere", 1, good.hlc, "audit",
                                   audit(0)).raw
            assert g1.gossip is not None
            for raw in (good.raw, forged, stranger, other_net):
                g1.gossip.publish_nowait(raw)
            expected = {"kind_not_allowed": 1, "bad_signature": 1, "not_member": 1,
                        "wrong_network": 1}

            def counted() -> bool:
                return all(a0.metrics.rejected_count(r) >= n for r, n in expected.items())

            await wait_for(counted, limit=20)
            assert a0.store.snapshot() == before
            assert a0.user_by_username("gw") is None and a0.user_by_username("root") is None
            for node in nodes:
                node.stop()


async def test_member_only_rpc_and_hello(tmp_path: Path, nursery: trio.Nursery) -> None:
    homes = make_network(tmp_path, 1, roles=[["auth"]])
    with trio.fail_after(30):
        async with run_network(nursery, homes) as (node,):
            stranger = make_host(Identity.generate())
            async with stranger.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                async with RpcClient.open(stranger) as client:
                    with trio.fail_after(15):
                        peer = await client.connect(node.addrs[0])
                        for method in ("ledgerSync", "ledgerPull"):
                            with pytest.raises(errors.NotMember):
                                await client.call(peer, method, {"vv": {}, "after": {}})
                        with pytest.raises(errors.WrongNetwork):
                            await client.call(peer, "ledgerHello",
                                              {"net": "p2p-x", "docs": []})
                        reply = await client.call(peer, "ledgerHello",
                                                  {"net": node.ledger.network_id, "docs": []})
                        assert reply["member"] is False and reply["docs"]
                        assert node.ledger.metrics.rejected_count("bad_signature") == 0
                        fake = {**reply["docs"][0],
                                "doc": {**reply["docs"][0]["doc"], "peer": stranger.get_id()
                                        .to_base58()}}
                        reply = await client.call(peer, "ledgerHello", {
                            "net": node.ledger.network_id, "docs": [fake]})
                        assert reply["member"] is False
                        assert node.ledger.metrics.rejected_count("bad_signature") == 1
                        # the ping of a client is not disturbed by the ledger
                        assert (await client.call(peer, "ping"))["member"] is False
            node.stop()


async def test_garbage_on_the_gossip_protocol_does_not_kill_the_node(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """py-libp2p's pubsub handler lets a protobuf DecodeError escape, which
    would take the host down; the ledger guards it."""
    from libp2p.peer.id import ID
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11

    homes = make_network(tmp_path, 1, roles=[["auth"]])
    with trio.fail_after(30):
        async with run_network(nursery, homes) as (node,):
            stranger = make_host(Identity.generate())
            async with stranger.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                async with RpcClient.open(stranger) as client:
                    with trio.fail_after(15):
                        peer = await client.connect(node.addrs[0])
                        stream = await stranger.new_stream(ID.from_base58(peer),
                                                           [PROTOCOL_ID_V11])
                        await stream.write(b"\x05\xff\xff\xff\xff\xff")  # not protobuf
                        with trio.move_on_after(5), contextlib.suppress(Exception):
                            await stream.read(1)  # the node resets the stream
                        assert (await client.call(peer, "ping"))["peer_id"] == node.peer_id
                        ev = node.ledger.append("audit", audit(1))
                        assert node.ledger.version_vector()[node.peer_id] == ev.seq
            node.stop()


async def test_stopped_node_catches_up_with_nothing_missing(tmp_path: Path,
                                                            nursery: trio.Nursery) -> None:
    homes = make_network(tmp_path, 3, roles=[["auth", "gateway"]] * 3)
    with trio.fail_after(90):
        async with run_network(nursery, homes[:2], tables=LEDGER) as (n0, n1):
            cfg = node_config(homes[2], roles=[], bootstrap=[n0.addrs[0]], tables=LEDGER)
            async with trio.open_nursery() as own:
                n2 = Node(cfg)
                await own.start(n2.run)
                await converge([n0, n1, n2])
                n2.ledger.append("audit", audit(-1))
                await converge([n0, n1, n2])
                n2.stop()
            stopped_at = n2.ledger.version_vector()
            # the others keep writing while n2 is down
            for i in range(0, 600, 50):
                n0.ledger.append_many([("audit", audit(i + j)) for j in range(50)])
                n1.ledger.append("usage", {"entries": [
                    {"user_id": str(uuid.UUID(int=i, version=4)), "key_id": None,
                     "hour": 3600 * 480_000, "requests": 1, "tokens": i}]})
                await trio.lowlevel.checkpoint()
            assert not n2.ledger.covers(n0.ledger.version_vector())
            n2.ledger.close()
            back = Node(cfg)
            assert back.ledger.version_vector() == stopped_at
            await nursery.start(back.run)
            await converge([n0, n1, back])
            assert back.ledger.store.count_events() == n0.ledger.store.count_events()
            assert back.ledger.store.snapshot() == n0.ledger.store.snapshot()
            assert back.ledger.store.held_count == 0
            back.stop()
            n0.stop()
            n1.stop()


async def test_late_joiner_and_removal(tmp_path: Path, nursery: trio.Nursery) -> None:
    homes = make_network(tmp_path, 2, roles=[["auth"], ["auth"]])
    owner = load_owner(homes[0])
    assert owner is not None
    with trio.fail_after(90):
        async with run_network(nursery, homes, tables=LEDGER) as (n0, n1):
            for i in range(30):
                n1.ledger.append("user.registered", register(f"user{i}"))
            # the owner's node admits a new node with a join token
            newcomer = Identity.load_or_create(tmp_path / "late")
            token = n0.ledger.admit_member(owner, newcomer.peer_id, ["gateway"],
                                           bootstrap=[n0.addrs[0]])
            network = import_join_token(tmp_path / "late", token, peer_id=newcomer.peer_id)
            late = Node(node_config(tmp_path / "late", roles=[], bootstrap=list(network.bootstrap),
                                    tables=LEDGER))
            await nursery.start(late.run)
            await converge([n0, n1, late])
            assert late.ledger.user_by_username("user29") is not None
            assert n1.ledger.is_member(late.peer_id)
            # removal: n1's events after the last one n0 has seen become void everywhere
            removal = n0.ledger.remove_member(owner, n1.peer_id)
            cutoff = removal.body["removal"]["doc"]["after"]
            await late.ledger.wait_for_event(removal.author, removal.seq)
            # n1 is handed its removal as it is cut off (not the whole event)
            await wait_for(lambda: n1.removed, limit=5)
            assert not late.ledger.is_member(n1.peer_id) and not n0.ledger.is_member(n1.peer_id)
            with pytest.raises(errors.UnauthorizedAuthor, match="removed"):
                n1.ledger.append("audit", audit(0))
            assert late.ledger.version_vector()[n1.peer_id] == cutoff
            # the removed node knows it, has stopped, and is connected to no one
            assert n1.removed
            await wait_for(lambda: all(n1.peer_id not in n.connected_peers()
                                       for n in (n0, late)), limit=5)
            for node in (n0, n1, late):
                node.stop()


async def test_erasure_leaves_no_personal_data_on_any_node(tmp_path: Path,
                                                           nursery: trio.Nursery) -> None:
    homes = make_network(tmp_path, 3, roles=[["auth", "gateway"]] * 3)
    with trio.fail_after(90):
        async with run_network(nursery, homes[:2], tables=LEDGER) as (n0, n1):
            reg = n0.ledger.append("user.registered", register("zoe"))
            uid = reg.body["user_id"]
            hour = int(time.time()) // 3600 * 3600
            n1.ledger.append("usage", {"entries": [{"user_id": uid, "key_id": None,
                                                    "hour": hour, "requests": 3, "tokens": 42}]})
            await converge([n0, n1])
            assert n1.ledger.user_by_email("zoe@example.org") is not None
            n0.ledger.erase_user(uid)
            await converge([n0, n1])
            late = Node(node_config(homes[2], roles=[], bootstrap=[n0.addrs[0]], tables=LEDGER))
            await nursery.start(late.run)
            await converge([n0, n1, late])
            for node in (n0, n1, late):
                lg = node.ledger
                assert lg.user(uid) is None and lg.user_by_username("zoe") is None
                assert lg.user_by_email("zoe@example.org") is None
                assert [(u.request_count, u.tokens_used) for u in lg.usage(user_id=uid)] \
                    == [(3, 42)]
                for (raw,) in lg.store.conn.execute("SELECT raw FROM events"):
                    assert b"zoe" not in raw
                assert lg.store.snapshot() == n0.ledger.store.snapshot()
            # the name is free again
            again = n1.ledger.append("user.registered", register("zoe"))
            await late.ledger.wait_for_event(again.author, again.seq)
            user = late.ledger.user_by_username("zoe")
            assert user is not None and user.id == again.body["user_id"]
            for node in (n0, n1, late):
                node.stop()


def test_the_gossip_router_keeps_digests_not_messages_and_trims_its_delivery_times() -> None:
    """py-libp2p 0.8.1's GossipSub kept up to 1,000 whole messages for its
    equivocation check and one float per message for ever: the heap grew
    with every request (benchmarks/RELIABILITY.md). Our router keeps a
    16-byte digest and still refuses a second message with the same origin
    and sequence number but other content; old delivery times are dropped
    at each heartbeat."""
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
    from libp2p.pubsub.pb import rpc_pb2

    from p2pinfer.ledger.gossip import DELIVERY_WINDOW, _router_class

    router = _router_class(GossipSub)(protocols=[PROTOCOL_ID_V11], degree=3, degree_low=2,
                                      degree_high=6)
    from libp2p.peer.id import ID

    origin = ID.from_base58(Identity.generate().peer_id).to_bytes()
    msg = rpc_pb2.Message(from_id=origin, seqno=bytes(8), data=b"x" * 32_000, topicIDs=["t"])
    assert router._check_equivocation(msg) and router._check_equivocation(msg)  # a duplicate
    stored = list(router.equivocation_detection.values())
    assert stored and all(isinstance(v, bytes) and len(v) == 16 for v in stored)
    other = rpc_pb2.Message(from_id=origin, seqno=bytes(8), data=b"y", topicIDs=["t"])
    assert not router._check_equivocation(other)  # same seqno, other content
    now = time.time()
    router.recent_message_deliveries["t"].extend([now - 2 * DELIVERY_WINDOW] * 1000 + [now])
    router.recent_message_deliveries["old"].append(now - 2 * DELIVERY_WINDOW)
    router._periodic_security_cleanup()
    assert dict(router.recent_message_deliveries) == {"t": [now]}


async def test_a_big_gossip_message_is_applied_in_steps() -> None:
    """A gossip message carrying a usage flush is applied at most
    DELIVER_BYTES of events at a time, with a scheduling point between, so
    the receiving node keeps serving while it applies them; small events
    still go in together."""
    from types import SimpleNamespace

    from libp2p.peer.id import ID

    from p2pinfer.ledger.gossip import DELIVER_BYTES, Gossip, encode_batch

    big = DELIVER_BYTES - 1000
    raws = [b"a" * big, b"b" * big, b"c" * 100, b"d" * 100, b"e" * big]
    sender = ID.from_base58(Identity.generate().peer_id).to_bytes()
    messages = [SimpleNamespace(from_id=sender, data=encode_batch(raws))]
    groups: list[list[bytes]] = []
    seen_between: set[int] = set()

    class Subscription:
        async def get(self) -> Any:
            if messages:
                return messages.pop()
            await trio.sleep_forever()

    gossip = Gossip(make_host(Identity.generate()), "t",
                    deliver=lambda group, origin: groups.append(group),
                    accept_from=lambda peer: True)

    async def other_work() -> None:
        while True:
            seen_between.add(len(groups))
            await trio.lowlevel.checkpoint()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_work)
            nursery.start_soon(gossip._reader, Subscription())
            await wait_for(lambda: sum(map(len, groups)) == len(raws))
            nursery.cancel_scope.cancel()
    assert groups == [raws[:1], raws[1:4], raws[4:]]
    assert seen_between & {1, 2}  # other tasks ran between the groups (trio may order
    # a batch either way, so which of the two is seen varies)
