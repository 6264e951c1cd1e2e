"""The metrics role on real nodes: the HTTP exporter (checked by prometheus'
parser and promtool), RPC access rules, recordMetric validation, the
disabled mode, and an error-rate alert produced by real failing RPC calls
that fires and resolves with a real webhook receiver."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import multiaddr
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from p2pinfer import errors
from p2pinfer.config import NodeConfig
from p2pinfer.identity import Identity
from p2pinfer.metrics import catalogue as cat
from p2pinfer.metrics.exporter import serve_http
from p2pinfer.rpc import RpcClient, make_host

from .helpers import make_network, node_config, run_nodes, wait_for

PROMTOOL = shutil.which("promtool")


async def promtool_check_metrics(text: str) -> None:
    """``promtool check metrics`` on ``text`` (skips if promtool is absent)."""
    if PROMTOOL is None:
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    proc = await trio.run_process([PROMTOOL, "check", "metrics"], stdin=text.encode(),
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def metrics_tables(**metrics: Any) -> dict[str, Any]:
    return {"metrics": {"prometheus_port": 0, "interval": 0.2, **metrics}}


@asynccontextmanager
async def stranger_client() -> AsyncIterator[RpcClient]:
    """An RPC client on a host that belongs to no network."""
    host = make_host(Identity.generate())
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        async with RpcClient.open(host) as client:
            yield client


class Receiver:
    """A real HTTP webhook receiver on 127.0.0.1."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.url = ""

        async def hook(request: Request) -> Response:
            self.bodies.append(json.loads(await request.body()))
            return Response("ok")

        self.app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])

    async def start(self, nursery: trio.Nursery) -> None:
        base = await nursery.start(serve_http, self.app, "127.0.0.1", 0)
        self.url = f"{base}/hook"

    def statuses(self, alert: str) -> list[str]:
        return [b["status"] for b in self.bodies if b["commonLabels"]["alertname"] == alert]


async def test_exporter_serves_metrics_that_parse_and_pass_promtool(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    cfg = node_config(tmp_path / "m", roles=["metrics"], tables=metrics_tables())
    with trio.fail_after(30):
        async with run_nodes(nursery, [cfg]) as (node,):
            role = node.roles["metrics"]
            assert role.url is not None and role.url.startswith("http://127.0.0.1:")
            # traffic of every kind the node counts
            node.metrics.observe_request(service="gateway", model="smollm2", seconds=0.4,
                                         tokens=42, user_id="user-1")
            node.metrics.rate_limit_violation("user-1", "key-1")
            await node.rpc.call(node.peer_id, "ping")
            with pytest.raises(errors.InvalidParams):
                await node.rpc.call(node.peer_id, "getSystemHealth", "bad")
            async with httpx.AsyncClient() as http:
                resp = await http.get(role.url + "/metrics")
                assert resp.status_code == 200
                assert resp.headers["content-type"].startswith("text/plain")
                text = resp.text
                health = (await http.get(role.url + "/health")).json()
                alerts = (await http.get(role.url + "/alerts")).json()
            fams = families(text)
            for name in ("ai_platform_requests", cat.REQUEST_DURATION, "ai_platform_tokens_used",
                         cat.ACTIVE_USERS, "ai_platform_rate_limit_violations",
                         cat.CONNECTED_PEERS, cat.PROCESS_CPU_PERCENT, cat.NODE_INFO,
                         "process_cpu_seconds", "process_resident_memory_bytes",
                         cat.NODE_UP, cat.ALERTS_FIRING, "ai_platform_ledger_events_applied"):
                assert name in fams, name
            for fam in fams.values():
                for sample in fam.samples:
                    if fam.name not in (cat.MODEL_WORKERS, cat.ALERTS_FIRING):
                        assert sample.labels["node"] == node.peer_id, sample
            requests = {(s.labels["service"], s.labels["method"], s.labels["status"]): s.value
                        for s in fams["ai_platform_requests"].samples}
            assert requests[("node", "ping", "success")] >= 1
            assert requests[("metrics", "getSystemHealth", "client_error")] == 1
            users = {s.labels["time_window"]: s.value for s in fams[cat.ACTIVE_USERS].samples}
            assert users == {"5m": 1.0, "1h": 1.0, "24h": 1.0}
            tokens = fams["ai_platform_tokens_used"].samples
            assert [(s.labels["model"], s.value) for s in tokens] == [("smollm2", 42.0)]
            # no user or key id is exposed unless an operator opts in
            assert "user-1" not in text and "key-1" not in text
            violations = [s for s in fams["ai_platform_rate_limit_violations"].samples
                          if s.name.endswith("_total")]
            assert [(s.labels["user_id"], s.labels["api_key_id"], s.value)
                    for s in violations] == [("hidden", "hidden", 1.0)]
            await promtool_check_metrics(text)

            assert health["status"] == "ok" and health["summary"]["up"] == 1
            assert health["nodes"][0]["peer_id"] == node.peer_id
            assert health["nodes"][0]["roles"] == ["metrics"]
            assert alerts["firing"] == [] and alerts["evaluations"] >= 1

            # the same over RPC: this node's registry, and the swarm view
            own = await node.rpc.call(node.peer_id, "getMetrics")
            assert "ai_platform_requests_total{" in own and 'node="' not in own
            await promtool_check_metrics(own)
            swarm = await node.rpc.call(node.peer_id, "getMetrics", {"scope": "swarm"})
            assert f'node="{node.peer_id}"' in swarm
            with pytest.raises(errors.InvalidParams, match="scope"):
                await node.rpc.call(node.peer_id, "getMetrics", {"scope": "galaxy"})


async def test_strangers_get_only_the_public_health_summary(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    cfg = node_config(tmp_path / "m", roles=["metrics"], tables=metrics_tables())
    with trio.fail_after(30):
        async with run_nodes(nursery, [cfg]) as (node,), stranger_client() as client:
            peer = await client.connect(node.addrs[0])
            for method in ("getMetrics", "recordMetric", "getNodeMetrics"):
                with pytest.raises(errors.NotMember):
                    await client.call(peer, method)
            health = await client.call(peer, "getSystemHealth")
            assert health["status"] == "ok" and health["summary"]["nodes"] == 1
            assert "nodes" not in health
            assert node.peer_id not in json.dumps({k: v for k, v in health.items()
                                                   if k != "checked_by"})
            with pytest.raises(errors.InvalidParams):
                await client.call(peer, "getSystemHealth", {"x": 1})


async def test_record_metric_refuses_bad_input_and_keeps_serving(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    homes = make_network(tmp_path, ["m", "c"])
    tables = metrics_tables(max_recorded_series=3)
    with trio.fail_after(40):
        async with run_nodes(nursery, [node_config(homes[0], roles=["metrics"],
                                                   tables=tables)]) as (m,):
            async with run_nodes(nursery, [node_config(homes[1], roles=[],
                                                       bootstrap=[m.addrs[0]])]) as (c,):
                await wait_for(lambda: m.is_member(c.peer_id) and c.is_member(m.peer_id),
                               limit=20)

                async def record(name: str, value: Any, labels: Any) -> Any:
                    return await c.rpc.call(m.peer_id, "recordMetric",
                                            {"metricName": name, "value": value,
                                             "labels": labels})

                good = {"service": "gateway", "method": "processInferenceRequest",
                        "status": "success"}
                done = await record(cat.REQUESTS, 3, good)
                assert done == {"metricName": cat.REQUESTS, "labels": good, "value": 3.0}
                cases = [
                    ((cat.REQUESTS + "_bogus", 1, good), "metricName", "unknown metric"),
                    ((cat.REQUESTS, 1, {"service": "gateway"}), "labels", "takes labels"),
                    ((cat.REQUESTS, 1, {**good, "user": "u"}), "labels", "takes labels"),
                    ((cat.REQUESTS, 1, {**good, "method": "DROP TABLE x"}), "labels.method",
                     "never free text"),
                    ((cat.REQUESTS, float("nan"), good), "value", "finite"),
                    ((cat.REQUESTS, float("inf"), good), "value", "finite"),
                    ((cat.REQUESTS, -2, good), "value", ">= 0"),
                ]
                for args, field, words in cases:
                    with pytest.raises(errors.InvalidParams, match=words) as info:
                        await record(*args)
                    assert info.value.data["field"] == field
                # too many label values: the cap (3 label sets) holds
                for i in range(2):
                    await record(cat.RATE_LIMIT_VIOLATIONS, 1,
                                 {"user_id": f"u{i}", "api_key_id": "k"})
                await record(cat.RATE_LIMIT_VIOLATIONS, 1, {"user_id": "u0", "api_key_id": "k"})
                for i in range(2):  # two of the three distinct REQUESTS sets are left
                    await record(cat.REQUESTS, 1, {**good, "method": f"m{i}"})
                with pytest.raises(errors.InvalidParams, match="too many label values"):
                    await record(cat.REQUESTS, 1, {**good, "method": "m99"})
                # the node kept serving, and kept what it accepted
                assert (await c.rpc.call(m.peer_id, "ping"))["peer_id"] == m.peer_id
                value = m.registry.get_sample_value(cat.REQUESTS, good)
                assert value == 3.0
                assert m.registry.get_sample_value(
                    cat.RATE_LIMIT_VIOLATIONS, {"user_id": "u0", "api_key_id": "k"}) == 2.0
                assert m.registry.get_sample_value(
                    cat.REQUESTS, {**good, "method": "m99"}) is None


async def test_metrics_disabled_turns_off_exporter_and_alerting(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    cfg = NodeConfig.from_mapping(
        {"node": {"home": str(tmp_path / "m"), "roles": ["metrics"],
                  "listen": ["/ip4/127.0.0.1/tcp/0"]}},
        env={"METRICS_ENABLED": "false", "PROMETHEUS_PORT": "0"})
    with trio.fail_after(30):
        async with run_nodes(nursery, [cfg]) as (node,):
            role = node.roles["metrics"]
            assert role.url is None and role.evaluator.evaluations == 0
            health = await node.rpc.call(node.peer_id, "getSystemHealth")
            assert health["alerting"] is False and health["summary"]["up"] == 1
            text = await node.rpc.call(node.peer_id, "getMetrics")
            assert "ai_platform_requests_total" in text


async def test_error_rate_alert_fires_and_resolves_with_webhook(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """Failing RPC calls from a real peer raise the error rate of the metrics
    service past 5%: HighErrorRate fires; once the window has passed it
    resolves; the webhook receives both."""
    receiver = Receiver()
    await receiver.start(nursery)
    tables = metrics_tables(interval=0.1, window=1.5, alert_for=0, min_requests=10,
                            webhook_url=receiver.url)
    cfg = node_config(tmp_path / "m", roles=["metrics"], tables=tables)
    with trio.fail_after(40):
        async with run_nodes(nursery, [cfg]) as (node,), stranger_client() as client:
            role = node.roles["metrics"]
            heard: list[tuple[str, str]] = []
            role.transition_listeners.append(
                lambda changes: heard.extend((t.status, t.alert.name) for t in changes))
            peer = await client.connect(node.addrs[0])
            await wait_for(lambda: role.collector.rounds >= 2)
            assert role.evaluator.firing() == []
            for _ in range(5):
                await client.call(peer, "getSystemHealth")
            # A broken dependency makes the handler fail (HandlerError, a
            # server error); a caller's bad params would be client errors,
            # which must not page anyone.
            for _ in range(5):
                with pytest.raises(errors.InvalidParams):
                    await client.call(peer, "getSystemHealth", "not params")
            working = role.collector.snapshot

            async def broken(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("collector broke")

            role.collector.snapshot = broken
            for _ in range(20):
                with pytest.raises(errors.HandlerError):
                    await client.call(peer, "getSystemHealth")
            role.collector.snapshot = working
            await wait_for(lambda: receiver.statuses("HighErrorRate") == ["firing"], limit=10)
            firing = [b for b in receiver.bodies if b["status"] == "firing"][0]
            assert firing["commonLabels"] == {"alertname": "HighErrorRate",
                                              "severity": "critical", "service": "metrics"}
            assert firing["alerts"][0]["value"] > 0.05
            assert firing["source"] == node.peer_id
            health = await client.call(peer, "getSystemHealth")
            assert health["status"] == "critical"
            assert health["alerts"][0]["name"] == "HighErrorRate"
            # no more failures: the window slides past them and the alert resolves
            await wait_for(lambda: receiver.statuses("HighErrorRate") == ["firing", "resolved"],
                           limit=10)
            resolved = receiver.bodies[-1]
            assert resolved["alerts"][0]["endsAt"] != "0001-01-01T00:00:00Z"
            assert role.evaluator.firing() == []
            notifier = role.notifier
            assert notifier is not None
            # the receiver has the body before the notifier has its answer
            # and counts the delivery: wait for the count, do not race it
            await wait_for(lambda: notifier.statistics().sent == 2, limit=5)
            assert heard == [("firing", "HighErrorRate"), ("resolved", "HighErrorRate")]


async def test_extra_rules_join_the_built_in_ones(tmp_path: Path,
                                                  nursery: trio.Nursery) -> None:
    """Another consumer (e.g. scaling triggers) adds a rule over the same samples."""
    from p2pinfer.metrics.alerts import AlertRule

    def tokens_flowing(snap: Any, hist: Any) -> dict[Any, float]:
        total = sum(inc for _node, _labels, inc in hist.increases(cat.TOKENS_USED))
        return {(): total} if total > 0 else {}

    cfg = node_config(tmp_path / "m", roles=["metrics"],
                      tables=metrics_tables(interval=0.1, window=1.0))
    with trio.fail_after(30):
        async with run_nodes(nursery, [cfg]) as (node,):
            role = node.roles["metrics"]
            role.add_rule(AlertRule("TokensFlowing", "warning", 0.0,
                                    f"rate({cat.TOKENS_USED}[1m]) > 0",
                                    "{{ $value }} tokens", tokens_flowing),
                          track=(cat.TOKENS_USED,))
            await wait_for(lambda: role.collector.rounds >= 2)
            node.metrics.observe_request(service="gateway", model="m", seconds=0.1, tokens=5)
            await wait_for(lambda: [a.name for a in role.evaluator.firing()] == ["TokensFlowing"])
            assert role.evaluator.firing()[0].value == 5.0
            text = await node.rpc.call(node.peer_id, "getMetrics", {"scope": "swarm"})
            firing = {s.labels["alertname"]: s.value
                      for s in families(text)[cat.ALERTS_FIRING].samples}
            assert firing["TokensFlowing"] == 1.0 and firing["NodeDown"] == 0.0
            await wait_for(lambda: role.evaluator.firing() == [])  # the window moved on


async def test_audit_log_query(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Audit rows the ledger holds come back filtered and newest first."""
    import time

    cfg = node_config(tmp_path / "m", roles=["metrics"], tables=metrics_tables())
    with trio.fail_after(30):
        async with run_nodes(nursery, [cfg]) as (node,):
            now = time.time()
            for i, (action, outcome) in enumerate([("user.register", "success"),
                                                   ("user.login", "failure"),
                                                   ("apikey.issue", "success")]):
                node.ledger.append("audit", {"actor": "user-1", "action": action,
                                             "outcome": outcome, "time": now + i,
                                             "target": "key-1", "source": "web"})
            got = await node.rpc.call(node.peer_id, "getAuditLog")
            assert [r["action"] for r in got["rows"]] == ["apikey.issue", "user.login",
                                                          "user.register"]
            assert got["rows"][0]["author"] == node.peer_id
            assert got["rows"][0]["target"] == "key-1" and got["rows"][0]["source"] == "web"
            logins = await node.rpc.call(node.peer_id, "getAuditLog",
                                         {"action": "user.login", "limit": 5})
            assert [r["outcome"] for r in logins["rows"]] == ["failure"]
            recent = await node.rpc.call(node.peer_id, "getAuditLog", {"since": now + 1.5})
            assert [r["action"] for r in recent["rows"]] == ["apikey.issue"]
            with pytest.raises(errors.InvalidParams, match="limit"):
                await node.rpc.call(node.peer_id, "getAuditLog", {"limit": 10_000})


async def test_health_says_why_it_is_degraded(tmp_path: Path, nursery: trio.Nursery) -> None:
    """A metrics node whose bootstrap peer does not answer, and which expects
    a model no worker serves: getSystemHealth and GET /health say degraded,
    and why, naming the peer and the model for members and neither for
    strangers; when the peer is back the link reason goes."""
    homes = make_network(tmp_path, ["m", "boot"], roles=["metrics"])
    boot_id = Identity.load_or_create(homes[1]).peer_id
    port = _free_port()
    boot_addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{boot_id}"
    cfg = node_config(homes[0], roles=["metrics"], bootstrap=[boot_addr],
                      tables=metrics_tables(expected_models=["llama-big"]))
    with trio.fail_after(60):
        async with run_nodes(nursery, [cfg]) as (node,):
            health = await node.rpc.call(node.peer_id, "getSystemHealth")
            assert health["status"] == "degraded"
            reasons = health["reasons"]
            assert any(f"not linked to its bootstrap peer {boot_id}" in r for r in reasons)
            assert "no worker serves model llama-big" in reasons
            url = node.roles["metrics"].url
            async with httpx.AsyncClient() as http:
                body = (await http.get(f"{url}/health")).json()
            assert body["status"] == "degraded" and body["reasons"] == reasons
            async with stranger_client() as client:
                peer = await client.connect(node.addrs[0])
                public = await client.call(peer, "getSystemHealth")
            assert public["status"] == "degraded"
            assert not any(boot_id in r for r in public["reasons"])
            assert any("not linked to a bootstrap peer" in r for r in public["reasons"])
            boot_cfg = node_config(homes[1], roles=[], listen=[f"/ip4/127.0.0.1/tcp/{port}"])
            async with run_nodes(nursery, [boot_cfg]):

                async def linked() -> bool:
                    h = await node.rpc.call(node.peer_id, "getSystemHealth")
                    return not any("bootstrap" in r for r in h["reasons"])

                await wait_for(linked, limit=20)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_health_reasons_name_nodes_only_for_members() -> None:
    from p2pinfer.health import health_reasons

    nodes = [{"peer_id": "12D3KooWdown", "up": False, "roles": ["inference"],
              "error": "TooSlowError"},
             {"peer_id": "12D3KooWhub", "up": True, "roles": ["auth", "gateway"],
              "problems": [{"kind": "fenced", "text": "restored from a backup: ..."},
                           {"kind": "unlinked",
                            "text": "not linked to its bootstrap peer 12D3KooWboot"}]}]
    alerts = [{"name": "NodeDown", "severity": "warning", "summary": "node 12D3KooWdown"},
              {"name": "HighErrorRate", "severity": "critical", "summary": "gateway: 9%"}]
    member = health_reasons(nodes, {"llama": 0, "fake": 2}, alerts, member=True)
    assert member == [
        "node 12D3KooWdown (inference) is down: TooSlowError",
        "node 12D3KooWhub (auth, gateway): restored from a backup: ...",
        "node 12D3KooWhub (auth, gateway): not linked to its bootstrap peer 12D3KooWboot",
        "no worker serves model llama",
        "alert HighErrorRate: gateway: 9%"]
    public = health_reasons(nodes, {"llama": 0}, alerts, member=False)
    assert public == ["a node (inference) is down", "a node (auth, gateway): restore fence",
                      "a node (auth, gateway): not linked to a bootstrap peer",
                      "no worker serves model llama", "alert HighErrorRate (critical)"]
    assert not any("12D3" in r for r in public)
