"""Alert rules: the built-in evaluator on hand-made snapshots, the shipped
Prometheus rule file checked and unit-tested by promtool, and the quantile
and counter-increase arithmetic they share."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from p2pinfer.metrics import catalogue as cat
from p2pinfer.metrics.alerts import (
    AlertEvaluator,
    CounterHistory,
    Transition,
    build_rules,
    histogram_quantile,
    lag_p95_by_node,
    render_rules_yaml,
    render_summary,
)
from p2pinfer.metrics.samples import Family, NodeSample, Sample, SwarmSnapshot
from p2pinfer.metrics.settings import MetricsSettings
from p2pinfer.metrics.webhook import alert_body

RULES_FILE = Path(__file__).parent.parent / "p2pinfer" / "metrics" / "alerts.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus')")


def requests_family(counts: dict[tuple[str, str], float]) -> Family:
    return Family("ai_platform_requests", "counter", "", [
        Sample(cat.REQUESTS, {"service": svc, "method": "m", "status": status}, value)
        for (svc, status), value in counts.items()])


def duration_family(bounds: dict[float, float], service: str = "gateway",
                    model: str = "smollm2") -> Family:
    samples = [Sample(cat.REQUEST_DURATION + "_bucket",
                      {"service": service, "model": model,
                       "le": "+Inf" if math.isinf(b) else str(b)}, c)
               for b, c in bounds.items()]
    return Family(cat.REQUEST_DURATION, "histogram", "", samples)


def snap(at: float, nodes: dict[str, list[Family] | None],
         models: dict[str, int] | None = None) -> SwarmSnapshot:
    return SwarmSnapshot(at=at, wall=1000.0 + at, collector="A", nodes={
        peer: NodeSample(peer, fams is not None, families=fams or [],
                         error=None if fams is not None else "down")
        for peer, fams in nodes.items()}, models=models or {})


def settings(**kw: Any) -> MetricsSettings:
    base: dict[str, Any] = {"window": 10.0, "alert_for": 0.0, "min_requests": 5}
    base.update(kw)
    return MetricsSettings(**base)


def firing_names(ev: AlertEvaluator) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {(a.name, tuple(sorted(a.labels.items()))) for a in ev.firing()}


def test_histogram_quantile_matches_prometheus() -> None:
    buckets = {0.5: 50.0, 1.0: 90.0, 5.0: 100.0, math.inf: 100.0}
    assert histogram_quantile(0.5, buckets) == 0.5
    assert histogram_quantile(0.95, buckets) == pytest.approx(1.0 + 4.0 * 5 / 10)
    # the rank falls in +Inf: the highest finite bound, as Prometheus answers
    assert histogram_quantile(0.99, {1.0: 10.0, math.inf: 20.0}) == 1.0
    assert math.isnan(histogram_quantile(0.95, {1.0: 0.0, math.inf: 0.0}))
    assert math.isnan(histogram_quantile(0.95, {1.0: 3.0}))


def test_counter_history_increases() -> None:
    hist = CounterHistory(window=10.0)
    hist.add(snap(0.0, {"A": [requests_family({("gateway", "success"): 5})]}))
    hist.add(snap(5.0, {"A": [requests_family({("gateway", "success"): 8,
                                               ("gateway", "error"): 4})],
                        "B": [requests_family({("gateway", "success"): 100})]}))
    got = {(n, lb["status"]): inc for n, lb, inc in hist.increases(cat.REQUESTS)}
    # a series absent from an older round of an answering node started at 0;
    # a node seen only once (B) has no baseline yet
    assert got == {("A", "success"): 3.0, ("A", "error"): 4.0}
    hist.add(snap(20.0, {"A": [requests_family({("gateway", "success"): 2})],
                         "B": [requests_family({("gateway", "success"): 130})]}))
    got = {(n, lb["status"]): inc for n, lb, inc in hist.increases(cat.REQUESTS)}
    # A restarted (counter went down): counted from 0; B grew by 30
    assert got == {("A", "success"): 2.0, ("B", "success"): 30.0}
    assert len(hist) == 2  # rounds older than the window's baseline are dropped


def test_node_down_waits_for_its_duration_then_fires_and_resolves() -> None:
    rules = build_rules(settings(alert_for=None))
    node_down = next(r for r in rules if r.name == "NodeDown")
    assert node_down.for_seconds == 60.0
    ev = AlertEvaluator(rules)
    hist = CounterHistory(10.0)
    assert ev.evaluate(snap(0.0, {"A": [], "B": None}), hist) == []
    assert [a.name for a in ev.pending()] == ["NodeDown"]
    assert ev.evaluate(snap(30.0, {"A": [], "B": None}), hist) == []
    fired = ev.evaluate(snap(61.0, {"A": [], "B": None}), hist)
    assert [(t.status, t.alert.name, t.alert.labels) for t in fired] == [
        ("firing", "NodeDown", {"node": "B"})]
    assert fired[0].alert.summary == "node B does not answer"
    assert ev.evaluate(snap(62.0, {"A": [], "B": None}), hist) == []  # fires once
    resolved = ev.evaluate(snap(70.0, {"A": [], "B": []}), hist)
    assert [(t.status, t.alert.name) for t in resolved] == [("resolved", "NodeDown")]
    assert resolved[0].alert.ended_wall == 1070.0 and ev.firing() == []
    # a condition that clears while pending never notifies
    ev.evaluate(snap(80.0, {"A": [], "B": None}), hist)
    assert ev.evaluate(snap(81.0, {"A": [], "B": []}), hist) == []


def test_error_rate_needs_enough_requests_and_resolves_when_the_window_passes() -> None:
    ev = AlertEvaluator(build_rules(settings()))
    hist = CounterHistory(10.0)

    def step(at: float, ok: float, err: float) -> list[Any]:
        s = snap(at, {"A": [requests_family({("gateway", "success"): ok,
                                             ("gateway", "error"): err,
                                             ("auth", "success"): 50 + at})]})
        hist.add(s)
        return ev.evaluate(s, hist)

    assert step(0.0, 0, 0) == []
    assert step(1.0, 1, 1) == []  # 50% errors, but only 2 requests: too few
    fired = step(2.0, 3, 4)
    assert [(t.status, t.alert.labels) for t in fired] == [("firing", {"service": "gateway"})]
    assert fired[0].alert.value == pytest.approx(4 / 7)
    assert "57.1% of requests fail" in fired[0].alert.summary
    resolved = step(5.0, 100, 4)  # 4 of 104 since the window's start: under 5%
    assert [(t.status, t.alert.name) for t in resolved] == [("resolved", "HighErrorRate")]
    assert ev.firing() == []


def test_latency_storm_no_worker_and_lag_rules() -> None:
    s = settings(latency_p95=5.0, rate_limit_storm=1.0, replication_lag=60.0)
    ev = AlertEvaluator(build_rules(s))
    hist = CounterHistory(10.0)
    lag_bucket = cat.LEDGER_LAG + "_bucket"

    def round_(at: float, slow: float, violations: float, lagging: float) -> SwarmSnapshot:
        fams = [
            duration_family({1.0: 10.0, 5.0: 10.0, 10.0: 10.0 + slow, math.inf: 10.0 + slow}),
            Family("ai_platform_rate_limit_violations", "counter", "", [
                Sample(cat.RATE_LIMIT_VIOLATIONS, {"user_id": "u", "api_key_id": "k"},
                       violations)]),
            Family(cat.LEDGER_LAG, "histogram", "", [
                Sample(lag_bucket, {"le": "1.0"}, 5.0),
                Sample(lag_bucket, {"le": "300.0"}, 5.0 + lagging),
                Sample(lag_bucket, {"le": "+Inf"}, 5.0 + lagging)]),
        ]
        out = snap(at, {"A": fams}, models={"smollm2": 1, "llama3": 0})
        hist.add(out)
        return out

    ev.evaluate(round_(0.0, 0, 0, 0), hist)
    assert firing_names(ev) == {("NoWorkerForModel", (("model", "llama3"),))}
    ev.evaluate(round_(5.0, 40, 30, 50), hist)
    assert firing_names(ev) == {
        ("NoWorkerForModel", (("model", "llama3"),)),
        ("HighLatencyP95", (("model", "smollm2"), ("service", "gateway"))),
        ("RateLimitStorm", ()),
        ("ReplicationLag", (("node", "A"),)),
    }
    assert lag_p95_by_node(hist)["A"] > 60.0
    storm = next(a for a in ev.firing() if a.name == "RateLimitStorm")
    assert storm.value == pytest.approx(30 / 10.0)
    body = alert_body(Transition("firing", storm), source="A")
    assert body["status"] == "firing" and body["commonLabels"]["alertname"] == "RateLimitStorm"
    assert body["alerts"][0]["endsAt"] == "0001-01-01T00:00:00Z"


def test_render_summary() -> None:
    assert render_summary("{{ $labels.node }} at {{ $value }}", {"node": "n1"}, 2.5) == "n1 at 2.5"
    assert render_summary("{{ $value | humanizePercentage }}", {}, 0.25) == "25.0%"


def test_shipped_rule_file_is_the_rendered_defaults() -> None:
    assert RULES_FILE.read_text() == render_rules_yaml(build_rules(MetricsSettings())), (
        "regenerate with: python -m p2pinfer.metrics.alerts > p2pinfer/metrics/alerts.yml")


@needs_promtool
def test_promtool_accepts_the_rule_file() -> None:
    out = subprocess.run([PROMTOOL or "promtool", "check", "rules", str(RULES_FILE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 6 rules found" in out.stdout


PROMTOOL_TESTS = """
rule_files:
  - {rules}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'ai_platform_node_up{{node="a"}}'
        values: '1 1 0 0 0 0 1 1'
      - series: 'ai_platform_model_workers{{model="smollm2"}}'
        values: '1 1 1 1 1 1 1 1'
      - series: 'ai_platform_requests_total{{service="gateway",method="p",status="success"}}'
        values: '0+10x20'
      - series: 'ai_platform_requests_total{{service="gateway",method="p",status="error"}}'
        values: '0+5x20'
      - series: 'ai_platform_rate_limit_violations_total{{node="a",user_id="u",api_key_id="k"}}'
        values: '0+600x20'
      - series: '{bucket}{{service="gateway",model="m",le="5.0"}}'
        values: '0+1x20'
      - series: '{bucket}{{service="gateway",model="m",le="10.0"}}'
        values: '0+100x20'
      - series: '{bucket}{{service="gateway",model="m",le="+Inf"}}'
        values: '0+100x20'
      - series: 'ai_platform_ledger_replication_lag_seconds_bucket{{node="a",le="60.0"}}'
        values: '0+0x20'
      - series: 'ai_platform_ledger_replication_lag_seconds_bucket{{node="a",le="300.0"}}'
        values: '0+10x20'
      - series: 'ai_platform_ledger_replication_lag_seconds_bucket{{node="a",le="+Inf"}}'
        values: '0+10x20'
    alert_rule_test:
      - eval_time: 2m
        alertname: NodeDown
        exp_alerts: []
      - eval_time: 3m
        alertname: NodeDown
        exp_alerts:
          - exp_labels: {{severity: warning, node: a}}
            exp_annotations: {{summary: "node a does not answer"}}
      - eval_time: 7m
        alertname: NodeDown
        exp_alerts: []
      - eval_time: 7m
        alertname: NoWorkerForModel
        exp_alerts: []
      - eval_time: 12m
        alertname: HighErrorRate
        exp_alerts:
          - exp_labels: {{severity: critical, service: gateway}}
            exp_annotations: {{summary: "gateway: 33.33% of requests fail"}}
      - eval_time: 12m
        alertname: RateLimitStorm
        exp_alerts:
          - exp_labels: {{severity: warning}}
            exp_annotations: {{summary: "10 rate-limit violations per second"}}
      - eval_time: 12m
        alertname: HighLatencyP95
        exp_alerts:
          - exp_labels: {{severity: warning, service: gateway, model: m}}
            exp_annotations: {{summary: "gateway/m: p95 latency 9.747474747474747s"}}
      - eval_time: 12m
        alertname: ReplicationLag
        exp_alerts:
          - exp_labels: {{severity: warning, node: a}}
            exp_annotations: {{summary: "node a: ledger 288s behind"}}
"""


@needs_promtool
def test_promtool_unit_tests_fire_the_prometheus_rules(tmp_path: Path) -> None:
    """The PromQL twins fire on series shaped like the swarm view's."""
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(PROMTOOL_TESTS.format(rules=RULES_FILE,
                                          bucket=cat.REQUEST_DURATION + "_bucket"))
    out = subprocess.run([PROMTOOL or "promtool", "test", "rules", str(spec)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_broken_rule_neither_stops_the_others_nor_resolves_its_alerts() -> None:
    from p2pinfer.metrics.alerts import AlertRule

    calls = {"n": 0}

    def flaky(snapshot: SwarmSnapshot, history: CounterHistory) -> dict[Any, float]:
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("bug in a rule")
        return {(): 1.0}

    rules = build_rules(settings())
    rules.append(AlertRule("Flaky", "warning", 0.0, "vector(1)", "flaky", flaky))
    ev = AlertEvaluator(rules)
    hist = CounterHistory(10.0)
    assert [t.alert.name for t in ev.evaluate(snap(0.0, {"A": []}), hist)] == ["Flaky"]
    changes = ev.evaluate(snap(1.0, {"A": [], "B": None}), hist)
    assert [(t.status, t.alert.name) for t in changes] == [("firing", "NodeDown")]
    assert {a.name for a in ev.firing()} == {"Flaky", "NodeDown"}
