"""Node-wide metrics: what every node counts, whatever its roles.

:class:`NodeMetrics` is built once per node (``node.metrics``) and owns the
platform's metrics (docs/metrics.md) on the node's own ``CollectorRegistry``:

    ai_platform_requests_total{service,method,status}     counter: every RPC served here
                                                          (status: success, error, timeout,
                                                          cancelled, denied, unknown) and
                                                          whatever count_request() adds
    ai_platform_rpc_duration_seconds{service,method}      histogram: RPC handler time
    ai_platform_request_duration_seconds{service,model}   histogram: end-to-end request time
                                                          (the gateway's observe_request)
    ai_platform_tokens_used_total{service,model}          counter
    ai_platform_active_users{time_window}                 gauge: distinct users seen by this
                                                          node in the last 5m / 1h / 24h
    ai_platform_rate_limit_violations_total{user_id,api_key_id}
                                                          counter, capped (see below)
    ai_platform_connected_peers                           gauge
    ai_platform_process_cpu_percent                       gauge (psutil; 100 = one core)
    ai_platform_node_info{version,roles}                  gauge = 1
    process_*                                             prometheus' process collector
                                                          (CPU seconds, resident memory, fds)

The inference role's ``ai_platform_inference_*`` collectors (queue depth,
cache hits and misses, tokens generated) and the ledger's
``ai_platform_ledger_*`` ones (events applied and rejected, replication lag
as a histogram, events behind) live on the same registry; they are not
duplicated here.

Cardinality: ``service`` and ``status`` come from fixed sets; ``method`` is
a registered RPC method name (anything else counts as ``_unknown``);
``model`` takes at most ``max_models`` distinct values per metric and
``(user_id, api_key_id)`` at most ``max_violation_pairs`` distinct pairs.
Past a cap new values are counted under ``_other``. Label values must be ids
or names (:data:`~p2pinfer.metrics.catalogue.LABEL_VALUE`); anything else is
counted as ``_invalid``. Never pass a secret (an API key, a token): pass its id.

Every node also serves ``getNodeMetrics`` (member-only), which the metrics
role uses to build the swarm-wide view.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import psutil  # type: ignore[import-untyped]
import trio
from prometheus_client import Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from .. import __version__
from ..grants import OPERATOR
from ..rpc.server import Access, CallContext, RpcServer, rpc_method
from . import catalogue as cat
from .samples import encode_families

if TYPE_CHECKING:
    from ..context import RoleContext

__all__ = ["NodeMetrics", "ActiveUsers"]

log = logging.getLogger(__name__)

MAX_TRACKED_USERS = 100_000
CPU_SAMPLE_SPACING = 1.0


# The user_id / api_key_id label value unless [metrics] label_user_ids is on.
HIDDEN = "hidden"

# What ai_platform_access_refused_total counts: (layer, reason).
REFUSALS = frozenset({
    ("rpc", "not_member"),        # a member-only method called by a non-member
    ("rpc", "no_grant"),          # a member lacking the grant the method needs
    ("discovery", "not_member"),  # a descriptor or provider from a non-member
    ("discovery", "no_grant"),    # a member announcing a role it is not granted
    ("pubsub", "not_member"),     # a ledger gossip stream to or from a non-member
    ("connection", "removed"),    # a connection of a removed node, closed
})


class ActiveUsers:
    """Distinct user ids seen in sliding windows (``ai_platform_active_users``).

    Keeps each user's last-seen time, oldest first, and forgets users older
    than the longest window; at most ``limit`` users are tracked (the oldest
    are dropped first).
    """

    def __init__(self, windows: dict[str, float], *, limit: int = MAX_TRACKED_USERS) -> None:
        self.windows = dict(windows)
        self.horizon = max(windows.values())
        self.limit = limit
        self._seen: OrderedDict[str, float] = OrderedDict()

    def touch(self, user_id: str, now: float) -> None:
        self._seen[user_id] = now
        self._seen.move_to_end(user_id)
        while len(self._seen) > self.limit:
            self._seen.popitem(last=False)

    def counts(self, now: float) -> dict[str, int]:
        """Distinct users per window at time ``now``."""
        while self._seen:
            _user, seen = next(iter(self._seen.items()))
            if seen >= now - self.horizon:
                break
            self._seen.popitem(last=False)
        out = {}
        for name, length in self.windows.items():
            cutoff = now - length
            out[name] = sum(1 for t in self._seen.values() if t >= cutoff)
        return out


class _CpuPercent:
    """Process CPU use in percent of one core, sampled at most once a second
    so that concurrent scrapes don't shorten each other's interval."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self._last: tuple[float, float] | None = None
        self.value = 0.0

    def read(self) -> float:
        now = time.monotonic()
        times = self._proc.cpu_times()
        cpu = times.user + times.system
        if self._last is None:
            self._last = (now, cpu)
        elif now - self._last[0] >= CPU_SAMPLE_SPACING:
            self.value = 100.0 * (cpu - self._last[1]) / (now - self._last[0])
            self._last = (now, cpu)
        return self.value


class _NodeCollector:
    """Series computed at scrape time from the node's state."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        users = GaugeMetricFamily(cat.ACTIVE_USERS, "Distinct users seen by this node",
                                  labels=["time_window"])
        for window, count in m.active_user_counts().items():
            users.add_metric([window], count)
        yield users
        yield GaugeMetricFamily(cat.CONNECTED_PEERS, "Peers with an open connection",
                                value=len(m.node.connected_peers()))
        yield GaugeMetricFamily(cat.PROCESS_CPU_PERCENT,
                                "CPU used by this process, percent of one core",
                                value=m.cpu.read())
        info = GaugeMetricFamily(cat.NODE_INFO, "Always 1: the node's version and roles",
                                 labels=["version", "roles"])
        info.add_metric([__version__, ",".join(sorted(m.node.role_names)) or "none"], 1)
        yield info


class NodeMetrics:
    """The node-wide metrics of one node (see the module docstring).

    Builds its collectors on ``node.registry``, observes every RPC the node
    serves (``rpc_server.observers``) and serves ``getNodeMetrics`` on it.

    Args:
        node: the node (its roles and ledger may not exist yet; they are
            looked up when used).
        rpc_server: the node's RPC server.
        clock: monotonic seconds for the active-user windows (default
            ``trio.current_time``).
    """

    def __init__(self, node: RoleContext, rpc_server: RpcServer, *,
                 clock: Callable[[], float] | None = None) -> None:
        from .settings import MetricsSettings

        self.node = node
        self.rpc_server = rpc_server
        #: more of the node's health, filled in by the node: sources of
        #: problems (``{"kind", "text"}``) and the scaling view
        self.problem_sources: list[Callable[[], list[dict[str, str]]]] = []
        self.scaling_status: Callable[[], dict[str, Any] | None] = lambda: None
        self.registry = node.registry
        self.settings = MetricsSettings.from_config(node.config)
        self._clock = clock or trio.current_time
        reg = self.registry
        self.requests = Counter(cat.REQUESTS, "Requests served, by service, method and outcome",
                                ["service", "method", "status"], registry=reg)
        self.rpc_duration = Histogram(cat.RPC_DURATION, "Time spent serving an RPC call",
                                      ["service", "method"], buckets=cat.RPC_DURATION_BUCKETS,
                                      registry=reg)
        self.request_duration = Histogram(
            cat.REQUEST_DURATION, "End-to-end request duration by service and model",
            ["service", "model"], buckets=cat.REQUEST_DURATION_BUCKETS, registry=reg)
        self.tokens_used = Counter(cat.TOKENS_USED, "Tokens used (prompt + completion)",
                                   ["service", "model"], registry=reg)
        self.rate_limit_violations = Counter(
            cat.RATE_LIMIT_VIOLATIONS, "Requests denied by a rate limit, by user and API key id",
            ["user_id", "api_key_id"], registry=reg)
        self.access_refused = Counter(
            cat.ACCESS_REFUSED, "What this node refused to a peer for want of membership or a "
            "grant, by layer (discovery, pubsub, rpc, connection) and reason",
            ["layer", "reason"], registry=reg)
        self.dials = Counter(
            cat.DIALS, "Outgoing libp2p connection attempts, by outcome (ok, failed)",
            ["outcome"], registry=reg)
        for outcome in ("ok", "failed"):
            self.dials.labels(outcome)
        self.active_users = ActiveUsers(cat.ACTIVE_USER_WINDOWS)
        self.cpu = _CpuPercent()
        for layer, reason in REFUSALS:  # every series exists from the start, at 0
            self.access_refused.labels(layer, reason)
        self._last_user_counts = {w: 0 for w in cat.ACTIVE_USER_WINDOWS}
        reg.register(_NodeCollector(self))
        ProcessCollector(registry=reg)
        s = self.settings
        self.guards: dict[str, cat.BoundedLabels] = {
            cat.REQUESTS: cat.BoundedLabels(s.max_recorded_series, 3),
            cat.REQUEST_DURATION: cat.BoundedLabels(s.max_models, 2),
            cat.TOKENS_USED: cat.BoundedLabels(s.max_models, 2),
            cat.RATE_LIMIT_VIOLATIONS: cat.BoundedLabels(s.max_violation_pairs, 2),
        }
        self._services: dict[str, str] = {}
        rpc_server.observers.append(self.observe_rpc)
        rpc_server.on_refused = lambda reason: self.refused("rpc", reason)
        rpc_server.register(self)

    # -- what other roles call ---------------------------------------------------
    def count_request(self, service: str, method: str, status: str, n: int = 1) -> None:
        """Count ``n`` requests served outside RPC (e.g. over HTTP by the web
        role or its front doors); RPC calls are counted automatically."""
        service = service if service in cat.SERVICES else cat.OTHER
        status = status if status in cat.STATUSES else "error"
        key = self.guards[cat.REQUESTS].admit((service, cat.clean_label(method), status))
        self.requests.labels(*key).inc(n)

    def observe_request(self, *, service: str, model: str, seconds: float,
                        tokens: int = 0, user_id: str | None = None) -> None:
        """Record one finished inference request (called by the gateway).

        Adds to ``ai_platform_request_duration_seconds{service,model}`` and
        ``ai_platform_tokens_used_total{service,model}`` and marks
        ``user_id`` active. It does not add to ``ai_platform_requests_total``:
        the RPC call that carried the request is already counted there.

        Args:
            service: the service that measured it (``gateway``).
            model: the model name the request resolved to.
            seconds: wall time from the request's arrival to its last token.
            tokens: prompt + completion tokens, as the backend counted them.
            user_id: the user's id (never a name or email).
        """
        service = service if service in cat.SERVICES else cat.OTHER
        key = (service, cat.clean_label(model))
        if math.isfinite(seconds) and seconds >= 0:
            self.request_duration.labels(*self.guards[cat.REQUEST_DURATION].admit(key)).observe(
                seconds)
        if tokens > 0:
            self.tokens_used.labels(*self.guards[cat.TOKENS_USED].admit(key)).inc(tokens)
        if user_id is not None:
            self.touch_user(user_id)

    def touch_user(self, user_id: str) -> None:
        """Mark a user active now (for ``ai_platform_active_users``)."""
        self.active_users.touch(cat.clean_label(user_id), self._clock())

    def rate_limit_violation(self, user_id: str, api_key_id: str | None = None) -> None:
        """Count one request denied by a rate limit.

        Args:
            user_id: the user's id.
            api_key_id: the API key's id (not the key), or None for a session.
        """
        if not self.settings.label_user_ids:
            # ids are personal data, and /metrics is read by whoever scrapes
            # it: an operator opts in with [metrics] label_user_ids
            pair = (HIDDEN, HIDDEN)
        else:
            pair = (cat.clean_label(user_id), cat.clean_label(api_key_id or "none"))
        self.rate_limit_violations.labels(
            *self.guards[cat.RATE_LIMIT_VIOLATIONS].admit(pair)).inc()

    def record(self, params: Any) -> dict[str, Any]:
        """Record a metric from validated ``recordMetric`` parameters.

        Raises:
            InvalidParams: see :func:`~p2pinfer.metrics.catalogue.validate_record`,
                or the metric's cardinality cap is reached.
        """
        spec, value, labels = cat.validate_record(params)
        labels = self.guards[spec.name].admit_strict(labels, spec.name)
        if spec.name == cat.REQUESTS:
            self.requests.labels(*labels).inc(value)
        elif spec.name == cat.REQUEST_DURATION:
            self.request_duration.labels(*labels).observe(value)
        elif spec.name == cat.TOKENS_USED:
            self.tokens_used.labels(*labels).inc(value)
        elif spec.name == cat.RATE_LIMIT_VIOLATIONS:
            self.rate_limit_violations.labels(*labels).inc(value)
        else:  # pragma: no cover - RECORDABLE and this switch are kept in step
            raise AssertionError(spec.name)
        return {"metricName": spec.name, "labels": dict(zip(spec.labels, labels, strict=True)),
                "value": value}

    # -- reading -------------------------------------------------------------------
    def active_user_counts(self) -> dict[str, int]:
        try:
            now = self._clock()
        except RuntimeError:  # collected outside trio.run: report the last counts
            return dict(self._last_user_counts)
        self._last_user_counts = self.active_users.counts(now)
        return dict(self._last_user_counts)

    def ledger_health(self) -> dict[str, Any] | None:
        """Events, held events, events behind and members of the node's ledger."""
        try:
            stats = self.node.ledger.statistics()
        except Exception:
            log.exception("ledger statistics unavailable")
            return None
        behind = self.registry.get_sample_value(cat.LEDGER_BEHIND)
        return {"events": stats.get("events"), "held": stats.get("held"),
                "members": stats.get("members"), "fenced": stats.get("fenced", False),
                "events_behind": None if behind is None else int(behind),
                "checkpoint_events": stats.get("checkpoint_events", 0),
                "pruned_to": stats.get("pruned_to", 0)}

    def text(self) -> bytes:
        """This node's metrics in the Prometheus text format."""
        return generate_latest(self.registry)

    def health(self) -> dict[str, Any]:
        """This node's own health summary (what ``getSystemHealth`` aggregates)."""
        node = self.node
        models: list[dict[str, Any]] = []
        inference = node.local_role("inference")
        if inference is not None:
            try:
                info = inference.describe()
                for m in info.get("models", []) if isinstance(info, dict) else []:
                    if isinstance(m, dict) and isinstance(m.get("name"), str):
                        models.append({"name": m["name"], "status": str(m.get("status", "?")),
                                       "queue_depth": m.get("queue_depth"),
                                       "in_flight": m.get("in_flight")})
            except Exception:
                log.exception("inference role failed to describe itself")
        # what keeps this node from serving fully: {"kind", "text"} (the
        # kind is what non-members are told; the text names models and peers)
        problems = [{"kind": "model_error", "text": f"model {m['name']} is in error"}
                    for m in models if m["status"] == "error"]
        ledger = self.ledger_health()
        if ledger is not None and ledger.get("fenced"):
            problems.append({"kind": "fenced", "text": (
                "restored from a backup: it writes nothing until enough members have "
                "told it the newest of its own events (restore fence)")})
        for source in self.problem_sources:
            problems.extend(source())
        return {
            "scaling": self.scaling_status(),
            "peer_id": node.peer_id,
            "status": "degraded" if problems else "ok",
            "problems": problems,
            "roles": sorted(node.role_names),
            "version": __version__,
            "uptime": round(time.time() - node.started_at, 3),
            "connected_peers": len(node.connected_peers()),
            "ledger": self.ledger_health(),
            "models": models,
        }

    # -- RPC observer ----------------------------------------------------------------
    def dialled(self, ok: bool) -> None:
        """One outgoing TCP connection attempt ended (see rpc.host.make_host)."""
        self.dials.labels("ok" if ok else "failed").inc()

    def refused(self, layer: str, reason: str) -> None:
        """Count something refused to a peer (see :data:`REFUSALS`)."""
        if (layer, reason) in REFUSALS:
            self.access_refused.labels(layer, reason).inc()

    def observe_rpc(self, method: str, status: str, seconds: float) -> None:
        """``node.rpc_server.observers`` callback: one served call."""
        service = self._service_of(method)
        if method not in self.rpc_server.methods:
            method = "_unknown"
        status = status if status in cat.STATUSES else "error"
        self.requests.labels(service, method, status).inc()
        if method != "_unknown" and status != "denied":
            self.rpc_duration.labels(service, method).observe(max(0.0, seconds))

    def _service_of(self, method: str) -> str:
        service = self._services.get(method)
        if service is not None:
            return service
        entry = self.rpc_server.methods.get(method)
        if entry is None:
            return "_unknown"
        owner = getattr(entry.func, "__self__", None)
        if owner is self:
            service = "metrics"
        elif owner is self.node:
            service = "node"
        else:
            name = getattr(owner, "name", None)
            service = name if isinstance(name, str) and name in cat.SERVICES else cat.OTHER
        self._services[method] = service
        return service

    # -- RPC -------------------------------------------------------------------------
    @rpc_method("getNodeMetrics", access=Access.MEMBER, grants=("metrics", OPERATOR))
    async def rpc_get_node_metrics(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """This node's metric families (wire form) and health, for a collector.

        Result: ``{"peer_id", "time", "health": {...}, "families": [...]}``
        (see :func:`~p2pinfer.metrics.samples.encode_families`).
        """
        return {
            "peer_id": self.node.peer_id,
            "time": time.time(),
            "health": self.health(),
            "families": encode_families(self.registry),
        }
