"""The swarm-wide view across three real nodes on loopback, and alerts on a
real fault: a worker goes down (NodeDown, NoWorkerForModel fire, the webhook
hears them) and comes back (both resolve, the webhook hears that too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio

from p2pinfer.metrics import catalogue as cat
from p2pinfer.node import Node

from .helpers import make_network, node_config, run_nodes, wait_for
from .test_metrics_role import Receiver, families, promtool_check_metrics

MODEL = {"name": "fake", "backend": "synthetic", "tokens": 3}


def metrics_cfg(home: Path, **extra: Any) -> Any:
    tables = {"metrics": {"prometheus_port": 0, "interval": 0.2, "discover_interval": 0.5,
                          "peer_timeout": 1.0, "alert_for": 0, **extra}}
    return node_config(home, roles=["metrics"], tables=tables)


def worker_cfg(home: Path, boot: Node) -> Any:
    return node_config(home, roles=["inference"], bootstrap=[boot.addrs[0]],
                       tables={"models": [MODEL]})


async def all_up(m: Node, peers: list[str]) -> bool:
    snap = await m.roles["metrics"].collector.snapshot()
    return all(p in snap.nodes and snap.nodes[p].up for p in peers) and \
        snap.models.get("fake") == 1


async def test_swarm_view_carries_every_nodes_series(tmp_path: Path,
                                                     nursery: trio.Nursery) -> None:
    homes = make_network(tmp_path, ["m", "w", "g"])
    with trio.fail_after(60):
        async with run_nodes(nursery, [metrics_cfg(homes[0])]) as (m,):
            async with run_nodes(nursery, [
                    worker_cfg(homes[1], m),
                    node_config(homes[2], roles=[], bootstrap=[m.addrs[0]])]) as (w, g):
                ids = {m.peer_id, w.peer_id, g.peer_id}
                await wait_for(lambda: all_up(m, [w.peer_id, g.peer_id]), limit=30)
                url = m.roles["metrics"].url
                async with httpx.AsyncClient() as http:
                    text = (await http.get(f"{url}/metrics")).text
                fams = families(text)
                # every node's own series, told apart by the node label
                for name in (cat.CONNECTED_PEERS, "process_resident_memory_bytes",
                             cat.NODE_INFO, "ai_platform_ledger_events_applied", cat.NODE_UP):
                    assert {s.labels["node"] for s in fams[name].samples} == ids, name
                assert all(s.value == 1.0 for s in fams[cat.NODE_UP].samples)
                roles = {s.labels["node"]: s.labels["roles"] for s in fams[cat.NODE_INFO].samples}
                assert roles == {m.peer_id: "metrics", w.peer_id: "inference", g.peer_id: "none"}
                # the worker's inference series arrive with its node label only
                queue = fams["ai_platform_inference_queue_depth"].samples
                assert [(s.labels["node"], s.labels["model"]) for s in queue] == [
                    (w.peer_id, "fake")]
                workers = {s.labels["model"]: s.value for s in fams[cat.MODEL_WORKERS].samples}
                assert workers == {"fake": 1.0}
                # the calls the collector made are counted on each peer
                asked = {s.labels["node"] for s in fams["ai_platform_requests"].samples
                         if s.labels["method"] == "getNodeMetrics"}
                assert asked == {w.peer_id, g.peer_id}
                await promtool_check_metrics(text)

                # a member asks the metrics node for the swarm's health over RPC
                health = await g.rpc.call(m.peer_id, "getSystemHealth")
                assert health["status"] == "ok"
                assert {n["peer_id"] for n in health["nodes"]} == ids
                worker = next(n for n in health["nodes"] if n["peer_id"] == w.peer_id)
                assert worker["roles"] == ["inference"]
                assert [x["name"] for x in worker["models"]] == ["fake"]
                assert health["models"] == {"fake": 1}
                assert health["summary"]["roles"] == {"metrics": 1, "inference": 1}


async def test_worker_down_fires_alerts_and_recovery_resolves_them(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    receiver = Receiver()
    await receiver.start(nursery)
    homes = make_network(tmp_path, ["m", "w", "g"])
    with trio.fail_after(90):
        async with run_nodes(nursery, [metrics_cfg(homes[0], webhook_url=receiver.url)]) as (m,):
            role = m.roles["metrics"]
            async with run_nodes(nursery, [
                    worker_cfg(homes[1], m),
                    node_config(homes[2], roles=[], bootstrap=[m.addrs[0]])]) as (w, g):
                await wait_for(lambda: all_up(m, [w.peer_id, g.peer_id]), limit=30)
                assert role.evaluator.firing() == [] and receiver.bodies == []
                worker_id = w.peer_id

                # the fault: the only worker of "fake" goes away
                w.stop()
                await wait_for(lambda: receiver.statuses("NodeDown") == ["firing"]
                               and receiver.statuses("NoWorkerForModel") == ["firing"],
                               limit=20)
                down = next(b for b in receiver.bodies
                            if b["commonLabels"]["alertname"] == "NodeDown")
                assert down["commonLabels"]["node"] == worker_id
                health = await g.rpc.call(m.peer_id, "getSystemHealth")
                assert health["status"] == "critical" and health["models"] == {"fake": 0}
                assert {a["name"] for a in health["alerts"]} == {"NodeDown", "NoWorkerForModel"}
                gone = next(n for n in health["nodes"] if n["peer_id"] == worker_id)
                assert gone["up"] is False and gone["status"] == "down" and gone["error"]

                # a dead peer does not stall a scrape beyond its timeout
                started = trio.current_time()
                async with httpx.AsyncClient() as http:
                    text = (await http.get(f"{role.url}/metrics")).text
                assert trio.current_time() - started < 5.0
                up = {s.labels["node"]: s.value for s in families(text)[cat.NODE_UP].samples}
                assert up[worker_id] == 0.0

                # recovery: the worker restarts (same key, same ledger) and rejoins
                async with run_nodes(nursery, [worker_cfg(homes[1], m)]) as (w2,):
                    assert w2.peer_id == worker_id
                    await wait_for(
                        lambda: receiver.statuses("NodeDown") == ["firing", "resolved"]
                        and receiver.statuses("NoWorkerForModel") == ["firing", "resolved"],
                        limit=30)
                    assert role.evaluator.firing() == []
                    health = await g.rpc.call(m.peer_id, "getSystemHealth")
                    assert health["status"] == "ok" and health["models"] == {"fake": 1}


async def test_audit_rows_written_on_one_node_are_queryable_from_another(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """An auth node records sensitive operations; after replication any member
    asks the metrics node for them."""
    import time

    homes = make_network(tmp_path, ["m", "a"])
    with trio.fail_after(40):
        async with run_nodes(nursery, [metrics_cfg(homes[0])]) as (m,):
            async with run_nodes(nursery, [node_config(homes[1], roles=[],
                                                       bootstrap=[m.addrs[0]])]) as (a,):
                now = time.time()
                last = None
                for i, (action, outcome) in enumerate([("user.register", "success"),
                                                       ("user.login", "failure"),
                                                       ("apikey.revoke", "success")]):
                    last = a.ledger.append("audit", {
                        "actor": "user-7", "action": action, "outcome": outcome,
                        "time": now + i, "target": "key-3", "source": a.peer_id})
                assert last is not None
                await m.ledger.wait_for_event(last.author, last.seq)
                got = await a.rpc.call(m.peer_id, "getAuditLog", {"actor": "user-7"})
                assert [(r["action"], r["outcome"]) for r in got["rows"]] == [
                    ("apikey.revoke", "success"), ("user.login", "failure"),
                    ("user.register", "success")]
                assert {r["author"] for r in got["rows"]} == {a.peer_id}
                failed = await a.rpc.call(m.peer_id, "getAuditLog", {"action": "user.login"})
                assert [r["time"] for r in failed["rows"]] == [now + 1]
