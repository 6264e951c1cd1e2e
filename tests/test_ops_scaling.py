"""Scaling triggers, the hook and slot autoscaling.

Sans-IO parts (the resizable slot pool, windows and the fire / clear
evaluator, the autoscaling decision, settings) are checked directly; then a
real worker with a slow synthetic model takes a burst of more than 100
queued requests and a real HTTP receiver on 127.0.0.1 (and a hook command)
hears the queue-depth trigger fire, from the worker and from the metrics
node's swarm view, and clear again; and a worker grows its slots under a
queue and shrinks them when idle without dropping a request.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from p2pinfer.config import NodeConfig
from p2pinfer.errors import ConfigError
from p2pinfer.inference.slots import SlotPool
from p2pinfer.scaling import ScalingSettings, SlotBounds
from p2pinfer.scaling.autoscale import decide
from p2pinfer.scaling.hooks import hook_body, hook_env
from p2pinfer.scaling.triggers import (
    Figures,
    FigureWindow,
    Sample,
    TriggerEvaluator,
    aggregate,
)
from p2pinfer.web.server import serve_app

from .helpers import make_network, node_config, run_nodes, wait_for


# -- the slot pool -----------------------------------------------------------------------
async def test_slot_pool_resizes_without_taking_slots_from_holders() -> None:
    pool = SlotPool(2)
    order: list[int] = []
    release = {i: trio.Event() for i in range(6)}

    async def user(i: int) -> None:
        await pool.acquire()
        order.append(i)
        await release[i].wait()
        pool.release()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(user, i)
                await trio.testing.wait_all_tasks_blocked()
            assert order == [0, 1] and pool.statistics().waiting == 4
            pool.resize(4)  # growing serves the first waiters at once (2 and 3, not 4, 5)
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(order) == [0, 1, 2, 3] and pool.in_use == 4
            pool.resize(1)  # shrinking takes nothing away from the holders
            await trio.testing.wait_all_tasks_blocked()
            assert pool.in_use == 4 and pool.free == 0 and len(order) == 4
            for i in (0, 1, 2):
                release[i].set()
                await trio.testing.wait_all_tasks_blocked()
            assert len(order) == 4 and pool.in_use == 1  # 4 > 3 > 2 > 1: no new grant
            release[3].set()
            await trio.testing.wait_all_tasks_blocked()
            assert order[4] == 4 and pool.in_use == 1  # the first in line, one at a time
            release[4].set()
            release[5].set()
    assert sorted(order) == [0, 1, 2, 3, 4, 5] and order[4:] == [4, 5] and pool.in_use == 0
    with pytest.raises(RuntimeError):
        pool.release()


async def test_slot_pool_cancelled_waiter_leaves_no_trace() -> None:
    pool = SlotPool(1)
    pool.acquire_nowait()
    with trio.move_on_after(0.05):
        await pool.acquire()
    assert pool.statistics().waiting == 0 and pool.in_use == 1
    pool.release()
    pool.acquire_nowait()
    with pytest.raises(trio.WouldBlock):
        pool.acquire_nowait()


# -- windows, triggers, decisions -----------------------------------------------------------
def settings(**kw: Any) -> ScalingSettings:
    return ScalingSettings(**{"window": 10.0, "hysteresis": 0.1, **kw})


def test_window_figures_and_trigger_fire_and_clear_with_hysteresis() -> None:
    win = FigureWindow(10.0)
    assert win.figures().samples == 0
    # (at, queue, in_flight, slots, cpu, completed, latency_total)
    for at, queue, cpu, done, spent in ((0, 0, None, 0, 0.0), (5, 120, 50.0, 4, 8.0),
                                        (10, 140, 70.0, 10, 44.0)):
        win.add(Sample(at, queue, 2, 2, cpu, done, spent))
    f = win.figures()
    assert f.samples == 2  # the sample at 0 is the baseline, outside the window
    assert f.queue_depth == 130 and f.cpu_percent == 60.0 and f.slots == 2
    assert f.completed == 10 and f.avg_response_time == pytest.approx(4.4)

    ev = TriggerEvaluator(settings())
    fired = ev.evaluate("m", f, now=1.0)
    assert [(e.status, e.trigger) for e in fired] == [("fired", "queue_depth")]
    assert ev.active("m", "queue_depth") and not ev.active("m", "cpu")
    # at 95 (above 100 * 0.9) it stays fired: no flapping at the threshold
    assert ev.evaluate("m", Figures(queue_depth=95, samples=1), now=2.0) == []
    cleared = ev.evaluate("m", Figures(queue_depth=90, samples=1), now=3.0)
    assert [(e.status, e.trigger, e.value) for e in cleared] == [("cleared", "queue_depth", 90)]
    # response time and CPU fire too; an unmeasurable response time keeps its state ...
    busy = Figures(cpu_percent=85, queue_depth=1, in_flight=2, avg_response_time=6.0, samples=1)
    assert {e.trigger for e in ev.evaluate("m", busy, now=4.0)} == {"cpu", "response_time"}
    assert ev.evaluate("m", Figures(cpu_percent=85, in_flight=2, samples=1), now=5.0) == []
    # ... until the model is idle
    idle = ev.evaluate("m", Figures(cpu_percent=10, samples=1), now=6.0)
    assert {(e.trigger, e.status) for e in idle} == {("cpu", "cleared"),
                                                       ("response_time", "cleared")}
    view = ev.view("m")
    assert set(view) == {"cpu", "queue_depth", "response_time"}
    assert view["queue_depth"]["threshold"] == 100.0


def test_swarm_aggregation_and_hook_body() -> None:
    a = Figures(cpu_percent=90, queue_depth=60, in_flight=4, slots=4, avg_response_time=2.0,
                completed=10, samples=5)
    b = Figures(cpu_percent=70, queue_depth=50, in_flight=2, slots=2, avg_response_time=5.0,
                completed=30, samples=4)
    s = aggregate([a, b, Figures(samples=3)])
    assert (s.queue_depth, s.in_flight, s.slots, s.workers) == (110, 6, 6, 3)
    assert s.cpu_percent == 80 and s.avg_response_time == pytest.approx(4.25)
    assert Figures.from_dict(s.to_dict()) == Figures(**{**vars(s), "avg_response_time": 4.25})
    assert Figures.from_dict({"queue_depth": "x"}) is None
    (event,) = TriggerEvaluator(settings(), "swarm").evaluate("m", s, now=7.0)
    body = hook_body(event, node="peer", window=10.0, wall=0.0)
    assert body["event"] == "fired" and body["status"] == "firing"
    assert (body["trigger"], body["model"], body["scope"], body["value"]) == (
        "queue_depth", "m", "swarm", 110)
    assert body["time_iso"] == "1970-01-01T00:00:00Z" and body["figures"]["workers"] == 3
    env = hook_env(body)
    assert env["P2PINFER_SCALING_TRIGGER"] == "queue_depth"
    assert json.loads(env["P2PINFER_SCALING_JSON"]) == body


def test_autoscale_decisions() -> None:
    s = settings(cooldown=10.0, grow_queue_depth=1.0, shrink_utilization=0.5)
    bounds = SlotBounds(1, 6)

    def go(f: Figures, slots: int, *, hot: bool = False, last: float | None = None) -> Any:
        d = decide(f, slots=slots, bounds=bounds, settings=s, cpu_hot=hot, now=100.0,
                   last_change=last)
        return None if d is None else (d.slots, d.reason)

    queued = Figures(queue_depth=3, in_flight=2, slots=2, samples=3)
    assert go(queued, 2) == (5, "queue")  # enough to absorb the queue ...
    assert go(Figures(queue_depth=30, samples=3), 2) == (6, "queue")  # ... within bounds
    assert go(queued, 2, hot=True) is None  # never more slots on a saturated CPU
    assert go(queued, 2, last=95.0) is None  # cooldown
    assert go(Figures(in_flight=0.5, slots=3, samples=3), 3) == (2, "idle")
    assert go(Figures(in_flight=2.5, slots=3, samples=3), 3) is None  # busy enough
    assert go(Figures(samples=3), 1) is None  # at the floor
    assert go(Figures(samples=0), 9) == (6, "bounds")  # back inside the bounds at once


def test_scaling_settings_from_config_and_env(tmp_path: Path) -> None:
    def cfg(table: dict[str, Any]) -> NodeConfig:
        return NodeConfig.from_mapping({"node": {"home": str(tmp_path)}, "scaling": table},
                                       env={})

    s = ScalingSettings.from_config(cfg({}), env={})
    assert (s.cpu_percent, s.queue_depth, s.response_time) == (80.0, 100.0, 5.0)
    assert not s.has_hook and not s.autoscale
    s = ScalingSettings.from_config(cfg({
        "hook_command": "notify --pool 'gpu a'", "autoscale": True, "max_slots": 6,
        "models": {"smollm2": {"max_slots": 3}}}), env={})
    assert s.hook_command == ("notify", "--pool", "gpu a")
    assert s.bounds("smollm2") == SlotBounds(1, 3) and s.bounds("other") == SlotBounds(1, 6)
    s = ScalingSettings.from_config(cfg({}), env={
        "P2PINFER_SCALING_HOOK_URL": "http://127.0.0.1:9/hook",
        "P2PINFER_SCALING_HOOK_COMMAND": "/bin/true"})
    assert s.hook_url == "http://127.0.0.1:9/hook" and s.hook_command == ("/bin/true",)
    for table, message in (({"queue_depth": -1}, "scaling.queue_depth: must be >= 0"),
                           ({"cpu": 80}, "scaling.cpu: unknown key"),
                           ({"hook_url": "ftp://x"}, "scaling.hook_url: must be an http"),
                           ({"min_slots": 4, "max_slots": 2}, "scaling.max_slots"),
                           ({"hook_command": [1]}, "scaling.hook_command"),
                           ({"models": {"m": {"slots": 2}}}, "scaling.models.m.slots")):
        with pytest.raises(ConfigError, match=message):
            ScalingSettings.from_config(cfg(table), env={})


# -- real nodes ------------------------------------------------------------------------------
class HookReceiver:
    """A real HTTP server on 127.0.0.1 that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.url = ""

        async def hook(request: Request) -> Response:
            self.bodies.append(json.loads(await request.body()))
            return Response("ok")

        self.app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])

    async def start(self, nursery: trio.Nursery) -> None:
        url, _port = await nursery.start(serve_app, self.app, "127.0.0.1", 0)
        self.url = f"{url}/hook"

    def events(self, scope: str, trigger: str = "queue_depth") -> list[str]:
        return [b["event"] for b in self.bodies
                if b["scope"] == scope and b["trigger"] == trigger]


HOOK_SCRIPT = """
import json, os, sys
body = json.load(sys.stdin)
with open(sys.argv[1], "a") as out:
    out.write(json.dumps({"body": body, "event": os.environ["P2PINFER_SCALING_EVENT"],
                          "trigger": os.environ["P2PINFER_SCALING_TRIGGER"]}) + "\\n")
"""


async def test_queue_depth_over_100_fires_the_hook_and_clears(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    receiver = HookReceiver()
    await receiver.start(nursery)
    script = tmp_path / "hook.py"
    script.write_text(HOOK_SCRIPT)
    heard = tmp_path / "heard.jsonl"
    hook = {"hook_url": receiver.url, "interval": 0.05, "window": 0.3}
    # a slow model: 2 slots, each answer waits 30 s for its first token
    model = {"name": "slow", "backend": "synthetic", "tokens": 2, "slots": 2,
             "first_token_delay": 30.0, "max_queue": 1000}
    homes = make_network(tmp_path, ["m", "w"])
    metrics_node = node_config(homes[0], roles=["metrics"], tables={
        "metrics": {"prometheus_port": 0, "interval": 0.1, "discover_interval": 0.2,
                    "peer_timeout": 1.0},
        "scaling": hook})
    with trio.fail_after(60):
        async with run_nodes(nursery, [metrics_node]) as (m,):
            worker = node_config(homes[1], roles=["inference"], bootstrap=[m.addrs[0]],
                                 tables={"models": [model], "scaling": {
                                     **hook, "hook_command": [sys.executable, str(script),
                                                              str(heard)]}})
            async with run_nodes(nursery, [worker]) as (w,):
                assert w.scaling is not None and m.scaling is not None
                assert w.scaling.collector is None and m.scaling.engine is None
                engine_model = w.roles["inference"].engine.models["slow"]
                async with trio.open_nursery() as burst:
                    async def ask(i: int) -> None:
                        async with w.rpc.stream(w.peer_id, "processPrompt",
                                                {"prompt": f"q{i}", "model": "slow"}) as s:
                            async for _ in s:
                                pass

                    for i in range(150):
                        burst.start_soon(ask, i)
                    await wait_for(lambda: engine_model.waiting == 148, limit=20)
                    # the worker's own trigger, then the swarm's on the metrics node
                    await wait_for(lambda: receiver.events("node") == ["fired"], limit=20)
                    await wait_for(lambda: receiver.events("swarm") == ["fired"], limit=20)
                    active = w.registry.get_sample_value(
                        "ai_platform_scaling_trigger_active",
                        {"scope": "node", "model": "slow", "trigger": "queue_depth"})
                    assert active == 1.0
                    # health (what the system page shows) lags a collection round
                    async def scaling_of(peer: str) -> dict[str, Any]:
                        health = await m.rpc.call(m.peer_id, "getSystemHealth")
                        node = next(n for n in health["nodes"] if n["peer_id"] == peer)
                        return dict(node["scaling"])

                    async def both_fired() -> bool:
                        mine = (await scaling_of(w.peer_id))["models"]["slow"]
                        swarm = (await scaling_of(m.peer_id)).get("swarm", {}).get("slow")
                        return bool(mine["triggers"]["queue_depth"]["active"] and swarm
                                    and swarm["triggers"]["queue_depth"]["active"])

                    await wait_for(both_fired, limit=10)
                    seen = (await scaling_of(w.peer_id))["models"]["slow"]
                    assert seen["figures"]["queue_depth"] > 100 and seen["slots"] == 2
                    # the clients give up: the queue empties
                    burst.cancel_scope.cancel()
                await wait_for(lambda: engine_model.waiting == 0 and engine_model.in_flight == 0,
                               limit=10)
                await wait_for(lambda: receiver.events("node") == ["fired", "cleared"],
                               limit=20)
                await wait_for(lambda: receiver.events("swarm") == ["fired", "cleared"],
                               limit=20)
                fired = next(b for b in receiver.bodies
                             if b["scope"] == "node" and b["trigger"] == "queue_depth")
                assert fired["model"] == "slow" and fired["node"] == w.peer_id
                assert fired["value"] > 100 and fired["threshold"] == 100.0
                assert fired["figures"]["slots"] == 2 and fired["window"] == 0.3
                # the hook command got the same bodies on stdin, and the env
                await wait_for(lambda: heard.exists() and len([
                    line for line in heard.read_text().splitlines()
                    if json.loads(line)["trigger"] == "queue_depth"]) == 2, limit=20)
                lines = [json.loads(x) for x in heard.read_text().splitlines()]
                mine = [x for x in lines if x["trigger"] == "queue_depth"]
                assert [x["event"] for x in mine] == ["fired", "cleared"]
                assert mine[0]["body"]["value"] == fired["value"]
                assert w.registry.get_sample_value("ai_platform_scaling_events_total", {
                    "scope": "node", "trigger": "queue_depth", "event": "cleared"}) == 1.0
                assert w.registry.get_sample_value("ai_platform_scaling_hook_runs_total", {
                    "kind": "webhook", "outcome": "success"}) >= 2


async def test_worker_grows_and_shrinks_its_slots_without_dropping_work(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    model = {"name": "m", "backend": "synthetic", "tokens": 3, "slots": 1,
             "first_token_delay": 0.6, "max_queue": 100}
    (home,) = make_network(tmp_path, 1, roles=["inference"])
    cfg = node_config(home, roles=["inference"], tables={"models": [model], "scaling": {
        "interval": 0.05, "window": 0.2, "autoscale": True, "min_slots": 1, "max_slots": 4,
        "cooldown": 0.1, "cpu_percent": 100.0}})
    with trio.fail_after(60):
        async with run_nodes(nursery, [cfg]) as (node,):
            engine = node.roles["inference"].engine
            served = engine.models["m"]
            results: list[dict[str, Any]] = []
            peak = 0

            async def ask(i: int) -> None:
                async with node.rpc.stream(node.peer_id, "processPrompt",
                                           {"prompt": f"x{i}", "model": "m",
                                            "cache": False}) as s:
                    text = "".join([c["delta"] async for c in s])
                results.append({"text": text, **s.trailer})

            async with trio.open_nursery() as burst:
                for i in range(8):
                    burst.start_soon(ask, i)
                while len(results) < 8:
                    peak = max(peak, served.slots)
                    await trio.sleep(0.02)
            assert peak == 4  # grown to its ceiling under the queue
            assert all(r["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 3
                       for r in results)
            # idle again: back down to the floor, one slot at a time
            await wait_for(lambda: served.slots == 1, limit=20)
            grew = node.registry.get_sample_value("ai_platform_scaling_slot_changes_total",
                                                  {"model": "m", "direction": "grow"})
            shrank = node.registry.get_sample_value("ai_platform_scaling_slot_changes_total",
                                                    {"model": "m", "direction": "shrink"})
            assert grew >= 1 and shrank == 3
            assert node.registry.get_sample_value("ai_platform_inference_slots",
                                                  {"model": "m"}) == 1.0
            status = node.metrics.health()["scaling"]["models"]["m"]
            assert status["bounds"] == [1, 4] and status["slots"] == 1
            assert served.outcomes["success"] == 8 and served.outcomes["error"] == 0
