"""The metrics role: the metrics service on a node.

A node with this role collects every member node's metrics over RPC
(:mod:`.collector`), serves one swarm-wide Prometheus ``/metrics`` on
``PROMETHEUS_PORT`` (:mod:`.exporter`), evaluates the alert rules
(:mod:`.alerts`) every ``metrics.interval`` seconds and posts fire and
resolve notifications to ``metrics.webhook_url`` (:mod:`.webhook`).
``METRICS_ENABLED=false`` turns the exporter, the collection loop and
alerting off; the RPC methods still answer (collecting on demand), and
every node keeps counting its own metrics (:class:`~.node_metrics.NodeMetrics`).

RPC methods:

``recordMetric`` (MEMBER)
    params: ``{"metricName": str, "value": number, "labels": {name: value}}``
    (or ``[metricName, value, labels]``). Only the metrics in
    :data:`~.catalogue.RECORDABLE` with exactly their label names; label
    values are ids or names (1-100 characters of ``[A-Za-z0-9_.:/@+=-]``);
    each metric takes at most ``metrics.max_recorded_series`` distinct label
    sets; counters and histograms take finite values >= 0.
    Result: ``{"metricName", "labels", "value"}``. Errors: InvalidParams
    (``data.field`` names the culprit).

``getMetrics`` (MEMBER)
    params: none, or ``{"scope": "node"}`` (this node's registry) or
    ``{"scope": "swarm"}`` (the swarm view served on ``/metrics``).
    Result: the Prometheus text exposition, as a string.

``getSystemHealth`` (PUBLIC)
    params: none. Result for members::

        {"status": "ok"|"degraded"|"critical", "time", "checked_by",
         "summary": {"nodes", "up", "down", "roles": {role: nodes up}},
         "models": {name: workers}, "reasons": ["why it is not ok", ...],
         "alerts": [alert, ...],
         "nodes": [{"peer_id", "up", "status", "roles", "version", "uptime",
                    "replication_lag", "ledger", "connected_peers", "models",
                    "last_seen", "error", "problems", "scaling"}]}

    ``reasons`` has one line per cause: a node down (named, with the error),
    a node's own problems (``problems``: ``{"kind", "text"}``: a model in
    error, the restore fence, a bootstrap peer it is not linked to), a
    model no worker serves, another firing alert. Only members whose
    certificate grants a node role count as nodes (not operator keys).

    ``scaling`` is the node's scaling view (:meth:`p2pinfer.scaling.Scaling.status`:
    window figures, triggers and slots per model; the swarm's on a metrics
    node), or None where scaling is off.
    ``replication_lag`` is the p95 over ``metrics.window`` of the ledger's
    replication lag on that node (None if it applied no replicated event in
    the window); ``ledger`` has its event, held, behind and member counts.

    Non-members get the same without ``nodes``, with alert labels other
    than ``service`` and ``model`` removed and reasons without peer ids.
    ``critical``: a critical alert fires; ``degraded``: there is a reason.

``getAuditLog`` (MEMBER)
    params: ``{"actor", "action", "since", "limit"}`` (all optional).
    Result: ``{"rows": [{"id", "time", "actor", "action", "target",
    "outcome", "source", "detail", "author"}]}``, newest first, from this
    node's replica of the ledger (see :mod:`.audit`). Errors: InvalidParams.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ..errors import InvalidParams
from ..grants import OBSERVERS, OPERATOR
from ..health import health_reasons
from ..rpc.server import Access, CallContext, rpc_method
from .alerts import (
    AlertEvaluator,
    AlertRule,
    CounterHistory,
    Transition,
    build_rules,
    lag_p95_by_node,
)
from .audit import audit_row, parse_audit_query
from .collector import ClusterCollector, swarm_families
from .exporter import build_app, serve_http
from .node_metrics import NodeMetrics
from .samples import SwarmSnapshot, render_swarm
from .settings import MetricsSettings
from .webhook import WebhookNotifier

if TYPE_CHECKING:
    from ..context import RoleContext

__all__ = ["MetricsRole"]

log = logging.getLogger(__name__)

PUBLIC_ALERT_LABELS = ("service", "model")


class MetricsRole:
    """The metrics role (see the module docstring).

    Args:
        node: the node; its ``metrics`` must be a :class:`NodeMetrics`.
        webhook_transport: an httpx transport for the webhook (tests).

    Raises:
        ConfigError: a bad ``[metrics]`` value, named.
    """

    name = "metrics"

    def __init__(self, node: RoleContext, *, webhook_transport: Any = None) -> None:
        self.node = node
        self.settings = MetricsSettings.from_config(node.config)
        if not isinstance(node.metrics, NodeMetrics):
            raise TypeError("the metrics role reads the node's NodeMetrics "
                            f"(p2pinfer.metrics.NodeMetrics), not {type(node.metrics).__name__}")
        self.node_metrics: NodeMetrics = node.metrics
        self.collector = ClusterCollector(node, self.node_metrics, self.settings)
        self.rules = build_rules(self.settings)
        self.evaluator = AlertEvaluator(self.rules)
        self.history = CounterHistory(self.settings.window)
        self.collector.listeners.append(self.history.add)
        self.notifier: WebhookNotifier | None = None
        if self.settings.webhook_url:
            self.notifier = WebhookNotifier(self.settings.webhook_url, source=node.peer_id,
                                            timeout=self.settings.webhook_timeout,
                                            transport=webhook_transport)
        self.url: str | None = None
        # Called with each round's transitions (after the webhook is queued):
        # the hook for other consumers of the evaluator, e.g. scaling triggers.
        self.transition_listeners: list[Callable[[list[Transition]], None]] = []
        self.app = build_app(metrics=self.swarm_text, health=self._member_health,
                             alerts=self.alerts_view)

    # -- lifecycle -------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the exporter and evaluate alerts until cancelled (when enabled)."""
        async with trio.open_nursery() as nursery:
            if self.settings.enabled:
                await nursery.start(self.collector.run)
                if self.notifier is not None:
                    await nursery.start(self.notifier.run)
                self.url = await nursery.start(serve_http, self.app, self.settings.host,
                                               self.settings.prometheus_port)
                await nursery.start(self._evaluate_loop)
            task_status.started()

    async def _evaluate_loop(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self.evaluate_once()
            await trio.sleep(self.settings.interval)

    async def evaluate_once(self) -> SwarmSnapshot:
        """Collect one round, evaluate every rule, notify transitions."""
        snap = await self.collector.snapshot()
        for transition in (changes := self.evaluator.evaluate(snap, self.history)):
            alert = transition.alert
            log.warning("alert %s %s %s: %s", alert.name, transition.status,
                        alert.labels, alert.summary)
        if self.notifier is not None:
            self.notifier.notify_transitions(changes)
        for listener in self.transition_listeners:
            try:
                listener(changes)
            except Exception:
                log.exception("alert transition listener failed")
        return snap

    def add_rule(self, rule: AlertRule, *, track: tuple[str, ...] = ()) -> None:
        """Evaluate one more rule with the built-in ones (its transitions go to
        the webhook and the listeners); ``track`` names counter samples its
        check reads through ``history.increases``."""
        for name in track:
            self.history.track(name)
        self.evaluator.rules.append(rule)

    def describe(self) -> dict[str, Any]:
        """For the node's descriptor: whether the exporter runs (not where)."""
        return {"enabled": self.settings.enabled}

    def topics(self) -> list[str]:
        return []

    # -- views -----------------------------------------------------------------------
    async def swarm_text(self) -> bytes:
        """The swarm-wide Prometheus exposition."""
        snap = await self.collector.snapshot()
        return render_swarm(snap, swarm_families(snap, self.evaluator.firing(), self.rules))

    def alerts_view(self) -> dict[str, Any]:
        return {"firing": [a.to_dict() for a in self.evaluator.firing()],
                "pending": [a.to_dict() for a in self.evaluator.pending()],
                "evaluations": self.evaluator.evaluations}

    async def _member_health(self) -> dict[str, Any]:
        return await self.system_health(member=True)

    async def system_health(self, *, member: bool) -> dict[str, Any]:
        """The swarm's health (see ``getSystemHealth`` in the module docstring)."""
        snap = await self.collector.snapshot(self.settings.interval)
        firing = self.evaluator.firing()
        lag = lag_p95_by_node(self.history)
        nodes = []
        roles: dict[str, int] = {}
        wall_offset = snap.wall - snap.at
        for peer_id in sorted(snap.nodes):
            sample = snap.nodes[peer_id]
            health = sample.health
            if sample.up:
                for role in health.get("roles", []) or []:
                    if isinstance(role, str):
                        roles[role] = roles.get(role, 0) + 1
            peer = self.collector.known.get(peer_id)
            last_up = snap.at if peer_id == self.node.peer_id else (
                peer.last_up if peer is not None else None)
            nodes.append({
                "peer_id": peer_id,
                "up": sample.up,
                "status": str(health.get("status", "ok")) if sample.up else "down",
                "roles": health.get("roles", []),
                "version": health.get("version"),
                "uptime": health.get("uptime"),
                "replication_lag": lag.get(peer_id),
                "ledger": health.get("ledger"),
                "connected_peers": health.get("connected_peers"),
                "models": health.get("models", []),
                "last_seen": None if last_up is None else round(last_up + wall_offset, 3),
                "error": sample.error,
                "problems": health.get("problems") or [],
                "scaling": health.get("scaling"),
            })
        reasons = health_reasons(nodes, snap.models, [a.to_dict() for a in firing],
                                 member=member)
        if any(a.severity == "critical" for a in firing):
            status = "critical"
        elif reasons:
            status = "degraded"
        else:
            status = "ok"
        up = sum(1 for n in nodes if n["up"])
        out: dict[str, Any] = {
            "status": status,
            "time": snap.wall,
            "checked_by": self.node.peer_id,
            "alerting": self.settings.enabled,
            "summary": {"nodes": len(nodes), "up": up, "down": len(nodes) - up,
                        "roles": roles},
            "models": dict(sorted(snap.models.items())),
            "reasons": reasons,
        }
        if member:
            out["alerts"] = [a.to_dict() for a in firing]
            out["nodes"] = nodes
        else:
            out["alerts"] = [
                {"name": a.name, "severity": a.severity, "since": a.started_wall,
                 "labels": {k: v for k, v in a.labels.items() if k in PUBLIC_ALERT_LABELS}}
                for a in firing
            ]
        return out

    # -- RPC -------------------------------------------------------------------------
    @rpc_method("recordMetric", access=Access.MEMBER)
    async def rpc_record_metric(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """Record one value of a catalogued metric on this node."""
        try:
            return self.node_metrics.record(params)
        except InvalidParams as exc:
            log.info("recordMetric from %s refused: %s", ctx.peer_id, exc.message,
                     extra={"peer": ctx.peer_id, "rpc_method": ctx.method,
                            "field": exc.data.get("field")})
            raise

    @rpc_method("getMetrics", access=Access.MEMBER, grants=tuple(OBSERVERS))
    async def rpc_get_metrics(self, ctx: CallContext, params: Any) -> str:
        """Prometheus text of this node (default) or of the whole swarm."""
        scope = "node"
        if isinstance(params, dict) and set(params) <= {"scope"}:
            scope = params.get("scope", "node")
        elif params not in (None, {}, []):
            raise InvalidParams('params: getMetrics takes none or {"scope": "node"|"swarm"}',
                                data={"field": "params"})
        if scope == "node":
            return self.node_metrics.text().decode()
        if scope == "swarm":
            return (await self.swarm_text()).decode()
        raise InvalidParams('scope: must be "node" or "swarm"', data={"field": "scope"})

    @rpc_method("getSystemHealth", access=Access.PUBLIC)
    async def rpc_get_system_health(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """Overall status of every node this one can reach (redacted for non-members)."""
        if params not in (None, {}, []):
            raise InvalidParams("params: getSystemHealth takes none", data={"field": "params"})
        return await self.system_health(member=ctx.is_member)

    @rpc_method("getAuditLog", access=Access.MEMBER, grants=(OPERATOR, "metrics", "web"))
    async def rpc_get_audit_log(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """Audit rows of sensitive operations across the swarm, newest first."""
        query = parse_audit_query(params)
        return {"rows": [audit_row(r) for r in self.node.ledger.audit(**query)]}
