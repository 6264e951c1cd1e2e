"""Alert rules, evaluated built in and shipped as Prometheus rules (sans-IO).

The same six conditions exist twice: as PromQL in ``alerts.yml`` (rendered
from :func:`build_rules` by ``python -m p2pinfer.metrics.alerts``, checked
by ``promtool check rules``) for a real Prometheus, and as Python checks
that the metrics role runs over each :class:`~.samples.SwarmSnapshot`, so
``getSystemHealth`` and the dashboard show firing alerts without one.

==================  ========  ===============================================
alert               severity  condition (window W = ``metrics.window``)
==================  ========  ===============================================
NodeDown            warning   a known member node does not answer
NoWorkerForModel    critical  a model seen before (or expected) has no node
                              where it is loaded
HighErrorRate       critical  per service: failed / all requests over W above
                              ``error_rate`` with at least ``min_requests``
HighLatencyP95      warning   per service and model: p95 request duration
                              over W above ``latency_p95`` seconds
ReplicationLag      warning   per node: p95 over W of the ledger's replication
                              lag (event creation to application) above
                              ``replication_lag`` seconds
RateLimitStorm      warning   rate-limit violations per second over W above
                              ``rate_limit_storm``
==================  ========  ===============================================

An alert is *pending* while its condition holds for less than the rule's
``for`` duration, then *firing*; it *resolves* when the condition no longer
holds. :meth:`AlertEvaluator.evaluate` returns those transitions.

Counter increases come from :class:`CounterHistory`: per node and series,
newest value minus the value at the start of the window (a series missing
from an older round of a node that answered counts as 0; a counter that went
down restarted and counts from 0).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import catalogue as cat
from .samples import SwarmSnapshot
from .settings import MetricsSettings

__all__ = [
    "Alert",
    "AlertEvaluator",
    "AlertRule",
    "CounterHistory",
    "Transition",
    "build_rules",
    "histogram_quantile",
    "lag_p95_by_node",
    "render_rules_yaml",
]

log = logging.getLogger(__name__)

LabelKey = tuple[tuple[str, str], ...]
Findings = dict[LabelKey, float]

_BUCKET = cat.REQUEST_DURATION + "_bucket"
_LAG_BUCKET = cat.LEDGER_LAG + "_bucket"
# Counter samples the history keeps (nothing else is needed for increases).
HISTORY_SAMPLES = (cat.REQUESTS, cat.RATE_LIMIT_VIOLATIONS, _BUCKET, _LAG_BUCKET)


def _key(labels: dict[str, str]) -> LabelKey:
    return tuple(sorted(labels.items()))


class CounterHistory:
    """Counter values per node over the last ``window`` seconds.

    Args:
        window: seconds of history kept (plus one older round as baseline).
        names: the sample names kept.
    """

    def __init__(self, window: float, names: Iterable[str] = HISTORY_SAMPLES) -> None:
        self.window = window
        self.names = tuple(names)
        self._rounds: deque[tuple[float, dict[str, dict[tuple[str, LabelKey], float]]]] = deque()

    def __len__(self) -> int:
        return len(self._rounds)

    def track(self, name: str) -> None:
        """Keep ``name`` (a counter or ``_bucket`` sample name) from the next round on,
        for rules added later (e.g. scaling triggers)."""
        if name not in self.names:
            self.names = (*self.names, name)

    def add(self, snapshot: SwarmSnapshot) -> None:
        """Remember the counters of every node that answered in ``snapshot``."""
        nodes: dict[str, dict[tuple[str, LabelKey], float]] = {}
        for node in snapshot.up_nodes():
            values: dict[tuple[str, LabelKey], float] = {}
            for name in self.names:
                for labels, value in node.values(name):
                    values[(name, _key(labels))] = value
            nodes[node.peer_id] = values
        if self._rounds and snapshot.at < self._rounds[-1][0]:
            return
        self._rounds.append((snapshot.at, nodes))
        cutoff = snapshot.at - self.window
        # keep the newest round at or before the cutoff as the baseline
        while len(self._rounds) >= 2 and self._rounds[1][0] <= cutoff:
            self._rounds.popleft()

    def increases(self, name: str) -> list[tuple[str, dict[str, str], float]]:
        """``(node, labels, increase over the window)`` of every series ``name``."""
        if not self._rounds:
            return []
        newest_at, newest = self._rounds[-1]
        out = []
        for peer_id, values in newest.items():
            base: dict[tuple[str, LabelKey], float] | None = None
            for at, nodes in self._rounds:
                if peer_id in nodes and at < newest_at:
                    base = nodes[peer_id]
                    break
            if base is None:
                continue  # a node seen once has no baseline yet
            for (sname, key), value in values.items():
                if sname != name:
                    continue
                before = base.get((sname, key), 0.0)
                out.append((peer_id, dict(key), value - before if value >= before else value))
        return out


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' ``histogram_quantile`` over cumulative bucket counts
    (``{upper bound: count}``, including ``+Inf``). NaN without observations."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return math.nan
    total = buckets[bounds[-1]]
    if total <= 0:
        return math.nan
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return prev_bound  # the highest finite bound, as Prometheus does
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return bounds[-2] if len(bounds) > 1 else math.nan


def _bound(labels: dict[str, str]) -> float | None:
    try:
        return float(labels.get("le", "nan"))
    except ValueError:
        return None


def lag_p95_by_node(history: CounterHistory) -> dict[str, float]:
    """Per node, the p95 of the ledger's replication lag over the window
    (nodes that applied no replicated event in the window are left out)."""
    per_node: dict[str, dict[float, float]] = {}
    for node, labels, inc in history.increases(_LAG_BUCKET):
        bound = _bound(labels)
        if bound is not None:
            buckets = per_node.setdefault(node, {})
            buckets[bound] = buckets.get(bound, 0.0) + inc
    out = {}
    for node, buckets in per_node.items():
        p95 = histogram_quantile(0.95, buckets)
        if not math.isnan(p95):
            out[node] = p95
    return out


@dataclass(frozen=True)
class AlertRule:
    """One alert: its PromQL twin and its built-in check.

    Attributes:
        name: the alert name.
        severity: ``warning`` or ``critical``.
        for_seconds: how long the condition must hold before it fires.
        expr: the PromQL expression for Prometheus.
        summary: annotation template (``{{ $labels.x }}``, ``{{ $value }}``).
        check: snapshot and history -> ``{labels: value}`` of every instance
            whose condition holds now.
    """

    name: str
    severity: str
    for_seconds: float
    expr: str
    summary: str
    check: Callable[[SwarmSnapshot, CounterHistory], Findings]


def _duration(seconds: float) -> str:
    """A PromQL duration: 5m, 30s, 250ms."""
    ms = round(seconds * 1000)
    if ms == 0:
        return "0s"
    if ms % 3_600_000 == 0:
        return f"{ms // 3_600_000}h"
    if ms % 60_000 == 0:
        return f"{ms // 60_000}m"
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"


def _num(value: float) -> str:
    return repr(float(value)).removesuffix(".0") if float(value).is_integer() else repr(value)


def build_rules(s: MetricsSettings) -> list[AlertRule]:
    """The six rules with the thresholds of ``s``."""
    w = _duration(s.window)
    errors = "|".join(sorted(cat.ERROR_STATUSES))
    req = cat.REQUESTS

    def dur(default: float) -> float:
        return default if s.alert_for is None else s.alert_for

    def node_down(snap: SwarmSnapshot, hist: CounterHistory) -> Findings:
        return {(("node", n.peer_id),): 0.0 for n in snap.nodes.values() if not n.up}

    def no_worker(snap: SwarmSnapshot, hist: CounterHistory) -> Findings:
        return {(("model", m),): 0.0 for m, count in snap.models.items() if count == 0}

    def error_rate(snap: SwarmSnapshot, hist: CounterHistory) -> Findings:
        total: dict[str, float] = {}
        failed: dict[str, float] = {}
        for _node, labels, inc in hist.increases(req):
            service = labels.get("service", "")
            total[service] = total.get(service, 0.0) + inc
            if labels.get("status") in cat.ERROR_STATUSES:
                failed[service] = failed.get(service, 0.0) + inc
        out: Findings = {}
        for service, n in total.items():
            ratio = failed.get(service, 0.0) / n if n > 0 else 0.0
            if n >= s.min_requests and ratio > s.error_rate:
                out[(("service", service),)] = ratio
        return out

    def latency(snap: SwarmSnapshot, hist: CounterHistory) -> Findings:
        groups: dict[tuple[str, str], dict[float, float]] = {}
        for _node, labels, inc in hist.increases(_BUCKET):
            bound = _bound(labels)
            if bound is None:
                continue
            group = groups.setdefault((labels.get("service", ""), labels.get("model", "")), {})
            group[bound] = group.get(bound, 0.0) + inc
        out: Findings = {}
        for (service, model), buckets in groups.items():
            p95 = histogram_quantile(0.95, buckets)
            if not math.isnan(p95) and p95 > s.latency_p95:
                out[(("model", model), ("service", service))] = p95
        return out

    def lag(snap: SwarmSnapshot, hist: CounterHistory) -> Findings:
        return {(("node", node),): p95 for node, p95 in lag_p95_by_node(hist).items()
                if p95 > s.replication_lag}

    def storm(snap: SwarmSnapshot, hist: CounterHistory) -> Findings:
        incs = hist.increases(cat.RATE_LIMIT_VIOLATIONS)
        if not incs:
            return {}
        rate = sum(inc for _n, _l, inc in incs) / s.window
        return {(): rate} if rate > s.rate_limit_storm else {}

    return [
        AlertRule("NodeDown", "warning", dur(60.0), f"{cat.NODE_UP} == 0",
                  "node {{ $labels.node }} does not answer", node_down),
        AlertRule("NoWorkerForModel", "critical", dur(60.0), f"{cat.MODEL_WORKERS} == 0",
                  "no worker serves model {{ $labels.model }}", no_worker),
        AlertRule(
            "HighErrorRate", "critical", dur(300.0),
            f'(sum by (service) (increase({req}{{status=~"{errors}"}}[{w}]))'
            f" / sum by (service) (increase({req}[{w}])) > {_num(s.error_rate)})"
            f" and sum by (service) (increase({req}[{w}])) >= {s.min_requests}",
            "{{ $labels.service }}: {{ $value | humanizePercentage }} of requests fail",
            error_rate),
        AlertRule(
            "HighLatencyP95", "warning", dur(300.0),
            "histogram_quantile(0.95, sum by (le, service, model) "
            f"(rate({_BUCKET}[{w}]))) > {_num(s.latency_p95)}",
            "{{ $labels.service }}/{{ $labels.model }}: p95 latency {{ $value }}s", latency),
        AlertRule("ReplicationLag", "warning", dur(300.0),
                  "histogram_quantile(0.95, sum by (node, le) "
                  f"(rate({_LAG_BUCKET}[{w}]))) > {_num(s.replication_lag)}",
                  "node {{ $labels.node }}: ledger {{ $value }}s behind", lag),
        AlertRule("RateLimitStorm", "warning", dur(300.0),
                  f"sum(rate({cat.RATE_LIMIT_VIOLATIONS}[{w}])) > {_num(s.rate_limit_storm)}",
                  "{{ $value }} rate-limit violations per second", storm),
    ]


_TEMPLATE = re.compile(r"\{\{\s*\$(labels\.(\w+)|value)(\s*\|\s*\w+)?\s*\}\}")


def render_summary(template: str, labels: dict[str, str], value: float) -> str:
    """Fill a Prometheus annotation template the way Prometheus would (roughly)."""

    def sub(m: re.Match[str]) -> str:
        if m.group(2) is not None:
            return labels.get(m.group(2), "")
        if m.group(3) and "humanizePercentage" in m.group(3):
            return f"{value * 100:.1f}%"
        return f"{value:.4g}"

    return _TEMPLATE.sub(sub, template)


@dataclass
class Alert:
    """One alert instance (a rule and a label set)."""

    name: str
    severity: str
    labels: dict[str, str]
    value: float
    summary: str
    active_since: float
    started_wall: float
    state: str = "pending"
    fired_at: float | None = None
    ended_wall: float | None = None
    fingerprint: str = field(default="")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view (health, dashboard, webhook)."""
        return {
            "name": self.name,
            "severity": self.severity,
            "state": self.state,
            "labels": dict(self.labels),
            "value": None if not math.isfinite(self.value) else self.value,
            "summary": self.summary,
            "since": self.started_wall,
            "ended": self.ended_wall,
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True)
class Transition:
    """An alert that started firing (``firing``) or stopped (``resolved``)."""

    status: str
    alert: Alert


class AlertEvaluator:
    """Runs the rules over successive snapshots and tracks alert states."""

    def __init__(self, rules: list[AlertRule]) -> None:
        self.rules = rules
        self._active: dict[tuple[str, LabelKey], Alert] = {}
        self.evaluations = 0

    def evaluate(self, snapshot: SwarmSnapshot, history: CounterHistory) -> list[Transition]:
        """Check every rule against ``snapshot`` (time ``snapshot.at``).

        Returns:
            the alerts that started firing or resolved in this round.
        """
        self.evaluations += 1
        now, wall = snapshot.at, snapshot.wall
        out: list[Transition] = []
        holding: set[tuple[str, LabelKey]] = set()
        for rule in self.rules:
            try:
                found = rule.check(snapshot, history)
            except Exception:
                # A broken (added) rule keeps its alerts as they are; the others run.
                log.exception("alert rule %s failed", rule.name)
                holding.update(i for i in self._active if i[0] == rule.name)
                continue
            for key, value in found.items():
                ident = (rule.name, key)
                holding.add(ident)
                labels = dict(key)
                alert = self._active.get(ident)
                if alert is None:
                    digest = hashlib.sha256(json.dumps([rule.name, key]).encode()).hexdigest()
                    alert = self._active[ident] = Alert(
                        rule.name, rule.severity, labels, value,
                        render_summary(rule.summary, labels, value), now, wall,
                        fingerprint=digest[:16])
                alert.value = value
                alert.summary = render_summary(rule.summary, labels, value)
                if alert.state == "pending" and now - alert.active_since >= rule.for_seconds:
                    alert.state = "firing"
                    alert.fired_at = now
                    out.append(Transition("firing", alert))
        for ident in [i for i in self._active if i not in holding]:
            alert = self._active.pop(ident)
            if alert.state == "firing":
                alert.state = "resolved"
                alert.ended_wall = wall
                out.append(Transition("resolved", alert))
        return out

    def firing(self) -> list[Alert]:
        """Alerts firing now, most severe first."""
        found = [a for a in self._active.values() if a.state == "firing"]
        return sorted(found, key=lambda a: (a.severity != "critical", a.name, a.fingerprint))

    def pending(self) -> list[Alert]:
        return [a for a in self._active.values() if a.state == "pending"]


def _q(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid YAML double-quoted scalar


def render_rules_yaml(rules: list[AlertRule]) -> str:
    """The rules as a Prometheus rule file (``promtool check rules`` accepts it)."""
    lines = [
        "# Generated by `python -m p2pinfer.metrics.alerts`; do not edit by hand.",
        "# Prometheus alert rules for a p2pinfer swarm scraped through a metrics node.",
        "groups:",
        "  - name: p2pinfer",
        "    rules:",
    ]
    for rule in rules:
        lines += [
            f"      - alert: {rule.name}",
            f"        expr: {_q(rule.expr)}",
            f"        for: {_duration(rule.for_seconds)}",
            "        labels:",
            f"          severity: {rule.severity}",
            "        annotations:",
            f"          summary: {_q(rule.summary)}",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the rule file for the default thresholds, or for a node's config
    (``python -m p2pinfer.metrics.alerts [node.toml]``)."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        from ..config import NodeConfig

        settings = MetricsSettings.from_config(NodeConfig.from_toml(args[0]))
    else:
        settings = MetricsSettings()
    sys.stdout.write(render_rules_yaml(build_rules(settings)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
