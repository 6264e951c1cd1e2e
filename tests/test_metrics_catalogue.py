"""The metric catalogue: recordMetric validation, cardinality caps, NodeMetrics
label handling, and the wire form of metric families (no network)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from p2pinfer.errors import InvalidParams
from p2pinfer.metrics import catalogue as cat
from p2pinfer.metrics.node_metrics import ActiveUsers
from p2pinfer.metrics.samples import (
    NodeSample,
    SwarmSnapshot,
    decode_families,
    encode_families,
    render_swarm,
)
from p2pinfer.metrics.settings import MetricsSettings

from .helpers import node_config

GOOD = {"metricName": cat.REQUESTS, "value": 2,
        "labels": {"service": "gateway", "method": "processInferenceRequest",
                   "status": "success"}}


def test_validate_record_accepts_catalogued_metrics() -> None:
    spec, value, labels = cat.validate_record(GOOD)
    assert spec.name == cat.REQUESTS and value == 2.0
    assert labels == ("gateway", "processInferenceRequest", "success")
    spec, value, labels = cat.validate_record(
        [cat.RATE_LIMIT_VIOLATIONS, 1, {"user_id": "u-1", "api_key_id": "k-1"}])
    assert spec.kind == "counter" and labels == ("u-1", "k-1")
    spec, value, _ = cat.validate_record(
        {"metricName": cat.REQUEST_DURATION, "value": 0.25,
         "labels": {"service": "gateway", "model": "org/model:q4"}})
    assert spec.kind == "histogram" and value == 0.25


@pytest.mark.parametrize(("params", "field", "words"), [
    ({**GOOD, "metricName": "ai_platform_everything"}, "metricName", "unknown metric"),
    ({**GOOD, "metricName": 7}, "metricName", "unknown metric"),
    ({**GOOD, "labels": {"service": "gateway", "method": "x"}}, "labels", "takes labels"),
    ({**GOOD, "labels": {**GOOD["labels"], "user": "u"}}, "labels", "takes labels"),
    ({**GOOD, "labels": {**GOOD["labels"], "method": "has space"}}, "labels.method",
     "never free text"),
    ({**GOOD, "labels": {**GOOD["labels"], "method": "m" * 101}}, "labels.method",
     "1-100 characters"),
    ({**GOOD, "labels": {**GOOD["labels"], "method": 3}}, "labels.method", "characters"),
    ({**GOOD, "labels": {**GOOD["labels"], "service": "wizard"}}, "labels.service",
     "must be one of"),
    ({**GOOD, "labels": "service=gateway"}, "labels", "must be a map"),
    ({**GOOD, "value": math.nan}, "value", "finite"),
    ({**GOOD, "value": math.inf}, "value", "finite"),
    ({**GOOD, "value": -1}, "value", ">= 0"),
    ({**GOOD, "value": True}, "value", "number"),
    ({**GOOD, "value": "1"}, "value", "number"),
    ({**GOOD, "extra": 1}, "extra", "unknown key"),
    ("recordMetric", "params", "takes"),
])
def test_validate_record_rejects(params: Any, field: str, words: str) -> None:
    with pytest.raises(InvalidParams, match=words) as info:
        cat.validate_record(params)
    assert info.value.data["field"] == field


def test_bounded_labels_fold_or_refuse_past_the_cap() -> None:
    guard = cat.BoundedLabels(2, 2)
    assert guard.admit(("a", "1")) == ("a", "1")
    assert guard.admit(("b", "2")) == ("b", "2")
    assert guard.admit(("c", "3")) == ("_other", "_other")
    assert guard.admit(("a", "1")) == ("a", "1")  # known pairs keep counting
    assert guard.folded == 1 and len(guard) == 2
    assert guard.admit_strict(("b", "2"), "m") == ("b", "2")
    with pytest.raises(InvalidParams, match="too many label values for m"):
        guard.admit_strict(("d", "4"), "m")


def test_clean_label() -> None:
    assert cat.clean_label("3f1c-uuid") == "3f1c-uuid"
    for bad in ("", "a b", "x" * 101, None, 5, 'quote"', "new\nline"):
        assert cat.clean_label(bad) == "_invalid"


def test_active_users_windows() -> None:
    users = ActiveUsers({"short": 10.0, "long": 100.0}, limit=3)
    users.touch("a", 0.0)
    users.touch("b", 50.0)
    users.touch("c", 95.0)
    assert users.counts(100.0) == {"short": 1, "long": 3}
    users.touch("a", 101.0)  # seen again: counted once
    assert users.counts(101.0) == {"short": 2, "long": 3}
    users.touch("d", 102.0)  # over the limit: the least recently seen (b) goes
    assert users.counts(102.0) == {"short": 3, "long": 3}
    assert users.counts(500.0) == {"short": 0, "long": 0}


def test_settings_from_config(tmp_path: Path) -> None:
    cfg = node_config(tmp_path, tables={"metrics": {"interval": 0.5, "alert_for": 0,
                                                    "expected_models": ["smollm2"]}})
    s = MetricsSettings.from_config(cfg)
    assert s.interval == 0.5 and s.alert_for == 0.0 and s.expected_models == ("smollm2",)
    assert MetricsSettings.from_config(node_config(tmp_path)).alert_for is None
    from p2pinfer.config import NodeConfig
    from p2pinfer.errors import ConfigError

    env_cfg = NodeConfig.from_mapping({"node": {"home": str(tmp_path)}},
                                      env={"METRICS_ENABLED": "false", "PROMETHEUS_PORT": "9311"})
    s = MetricsSettings.from_config(env_cfg)
    assert s.enabled is False and s.prometheus_port == 9311
    with pytest.raises(ConfigError, match="metrics.colour: unknown key"):
        MetricsSettings.from_config(node_config(tmp_path, tables={"metrics": {"colour": 1}}))
    with pytest.raises(ConfigError, match="metrics.webhook_url"):
        MetricsSettings.from_config(node_config(tmp_path,
                                                tables={"metrics": {"webhook_url": "ftp://x"}}))


def test_families_round_trip_and_swarm_render() -> None:
    reg = CollectorRegistry()
    Counter("demo_requests_total", "d", ["node", "x"], registry=reg).labels("inner", "1").inc(3)
    Histogram("demo_seconds", "h", buckets=(1.0,), registry=reg).observe(0.5)
    wire = encode_families(reg)
    assert all(not s[0].endswith("_created") for f in wire for s in f[3])
    fams = decode_families(wire)
    snap = SwarmSnapshot(at=0.0, wall=0.0, collector="A", nodes={
        "A": NodeSample("A", True, families=fams),
        "B": NodeSample("B", True, families=fams),
        "C": NodeSample("C", False, error="down"),
    })
    text = render_swarm(snap).decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    samples = parsed["demo_requests"].samples
    assert {s.labels["node"] for s in samples} == {"A", "B"}
    assert all(s.labels["exported_node"] == "inner" for s in samples)
    assert text.count("# TYPE demo_requests_total counter") == 1
    assert {s.labels["node"] for s in parsed["demo_seconds"].samples} == {"A", "B"}


@pytest.mark.parametrize("bad", [
    None, {}, [["x"]], [["bad name", "gauge", "", []]], [["x", "weird", "", []]],
    [["x", "gauge", "", [["x", {"bad-label": "v"}, 1.0]]]],
    [["x", "gauge", "", [["x", {}, "1"]]]],
    [["x", "gauge", "", [["x", {"a": 1}, 1.0]]]],
    [["x", "gauge", "", "samples"]],
])
def test_decode_families_refuses_malformed(bad: Any) -> None:
    with pytest.raises(ValueError):
        decode_families(bad)


def test_audit_query_params() -> None:
    from p2pinfer.metrics.audit import parse_audit_query

    assert parse_audit_query(None) == {"limit": 100}
    assert parse_audit_query({"actor": "u-1", "action": "login", "since": 5, "limit": 7}) == {
        "actor": "u-1", "action": "login", "since": 5.0, "limit": 7}
    for bad, field in [({"limit": 0}, "limit"), ({"limit": 5000}, "limit"),
                       ({"limit": "9"}, "limit"), ({"since": math.nan}, "since"),
                       ({"since": True}, "since"), ({"actor": ""}, "actor"),
                       ({"action": "x" * 201}, "action"), ({"who": 1}, "who"),
                       ("all", "params")]:
        with pytest.raises(InvalidParams) as info:
            parse_audit_query(bad)
        assert info.value.data["field"] == field


def test_package_exports_and_stays_light() -> None:
    import subprocess
    import sys

    import p2pinfer.metrics as pkg

    assert sorted(pkg.__all__) == ["BoundedLabels", "MetricsSettings", "NodeMetrics",
                                   "RECORDABLE", "validate_record"]
    assert all(hasattr(pkg, name) for name in pkg.__all__)
    # every node imports the package; only metrics nodes need the HTTP stack
    code = ("import sys, p2pinfer.metrics; "
            "print(sorted(m for m in ('starlette', 'hypercorn', 'httpx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"
