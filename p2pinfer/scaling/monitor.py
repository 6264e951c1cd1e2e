"""The node's scaling monitor: samples, triggers, hook, autoscaling, metrics.

:class:`Scaling` is built by the node (``node.scaling``) when ``[scaling]
enabled`` is on and the node has something to watch:

- on a node with the **inference** role, every ``interval`` seconds it
  samples each model of the engine (queue depth, slots in use, slots,
  finished requests and their total duration) and the host's CPU use,
  keeps them in a :class:`~.triggers.FigureWindow` per model, evaluates the
  triggers (scope ``node``), queues a hook body for each change and, with
  ``autoscale``, resizes the model's slots (:func:`~.autoscale.decide`);
- on a node with the **metrics** role (and ``swarm = true``), after every
  collection round it merges the figures that workers report in their
  health (:meth:`Scaling.status`) into per-model swarm figures
  (:func:`~.triggers.aggregate`) and evaluates the same triggers on them
  (scope ``swarm``): one place for an orchestrator to listen to.

Both are visible:

- metrics (node registry)::

    ai_platform_scaling_figure{scope,model,figure}           gauge  window figures
    ai_platform_scaling_trigger_active{scope,model,trigger}  gauge  1 while fired
    ai_platform_scaling_events_total{scope,trigger,event}    counter fired / cleared
    ai_platform_scaling_hook_runs_total{kind,outcome}        counter command / webhook
    ai_platform_scaling_slot_changes_total{model,direction}  counter grow / shrink / bounds

- health: :meth:`Scaling.status` is part of the node's health
  (``getNodeMetrics``), so ``getSystemHealth`` lists it per node and the
  web role's system page shows it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import psutil  # type: ignore[import-untyped]
import trio
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from ..metrics import catalogue as cat
from .autoscale import decide
from .hooks import HookRunner, hook_body
from .settings import TRIGGERS, ScalingSettings
from .triggers import Figures, FigureWindow, Sample, TriggerEvaluator, TriggerEvent, aggregate

if TYPE_CHECKING:
    from ..context import RoleContext
    from ..node import Node

__all__ = ["Scaling", "HostCpu"]

log = logging.getLogger(__name__)

FIGURES = ("cpu_percent", "queue_depth", "in_flight", "slots", "avg_response_time")
MAX_SWARM_MODELS = 100


class HostCpu:
    """The host's CPU use in percent (all cores = 100) since the last read;
    None on the first read (psutil needs two readings)."""

    def __init__(self) -> None:
        self._primed = False

    def __call__(self) -> float | None:
        value = float(psutil.cpu_percent(interval=None))
        if not self._primed:
            self._primed = True
            return None
        return value


class _Collector:
    """Scaling gauges, computed at scrape time from the monitor's state."""

    def __init__(self, scaling: Scaling) -> None:
        self.scaling = scaling

    def collect(self) -> Iterator[Metric]:
        figure = GaugeMetricFamily("ai_platform_scaling_figure",
                                   "Scaling figures of a model over the window",
                                   labels=["scope", "model", "figure"])
        active = GaugeMetricFamily("ai_platform_scaling_trigger_active",
                                   "1 while a scaling trigger of a model is fired",
                                   labels=["scope", "model", "trigger"])
        for scope, figures, evaluator in self.scaling.scopes():
            for model, figs in figures.items():
                label = cat.clean_label(model)
                for name in FIGURES:
                    value = getattr(figs, name)
                    if value is not None:
                        figure.add_metric([scope, label, name], float(value))
                for trigger in TRIGGERS:
                    active.add_metric([scope, label, trigger],
                                      1.0 if evaluator.active(model, trigger) else 0.0)
        yield figure
        yield active


class Scaling:
    """Scaling triggers, hook and autoscaling of one node (see the module docstring).

    Args:
        node: the node (``peer_id``, ``registry``, ``invalidate_descriptor``).
        settings: ``[scaling]``.
        engine: the inference engine to watch (None: not a worker).
        collector: the metrics role's cluster collector (None: no swarm scope).
        cpu: returns the host's CPU percent (default :class:`HostCpu`).
        transport: an httpx transport for the webhook (tests).
    """

    def __init__(self, node: RoleContext, settings: ScalingSettings, *, engine: Any = None,
                 collector: Any = None, cpu: Callable[[], float | None] | None = None,
                 transport: Any = None) -> None:
        self.node = node
        self.settings = settings
        self.engine = engine
        self.cpu = cpu or HostCpu()
        self.windows: dict[str, FigureWindow] = {}
        self.figures: dict[str, Figures] = {}
        self.evaluator = TriggerEvaluator(settings, "node")
        self.swarm_figures: dict[str, Figures] = {}
        self.swarm_evaluator = TriggerEvaluator(settings, "swarm")
        self.last_change: dict[str, float] = {}
        self.last_change_wall: dict[str, float] = {}
        self._resizing: set[str] = set()
        self.events: list[dict[str, Any]] = []  # the last few transitions, newest last
        registry = node.registry
        self.event_count = Counter("ai_platform_scaling_events",
                                   "Scaling trigger transitions", ["scope", "trigger", "event"],
                                   registry=registry)
        self.hook_runs = Counter("ai_platform_scaling_hook_runs",
                                 "Scaling hook deliveries", ["kind", "outcome"],
                                 registry=registry)
        self.slot_changes = Counter("ai_platform_scaling_slot_changes",
                                    "Slot count changes made by autoscaling",
                                    ["model", "direction"], registry=registry)
        registry.register(_Collector(self))
        self.hooks = HookRunner(command=settings.hook_command, url=settings.hook_url,
                                timeout=settings.hook_timeout, attempts=settings.hook_attempts,
                                transport=transport,
                                on_result=lambda k, o: self.hook_runs.labels(k, o).inc())
        self.collector = collector
        if collector is not None and settings.swarm:
            collector.listeners.append(self.on_snapshot)

    @classmethod
    def for_node(cls, node: Node) -> Scaling | None:
        """The node's scaling monitor, or None when ``[scaling] enabled`` is
        off or the node has neither the inference nor the metrics role.

        Scaling sits above the roles: it watches the inference role's engine
        and the metrics role's collection rounds, which are not part of
        their public face (:class:`~p2pinfer.context.Role`)."""
        settings = ScalingSettings.from_config(node.config)
        engine: Any = None
        collector: Any = None
        # imported only when the node runs the role (a gateway-only node
        # never loads the inference package)
        if "inference" in node.roles:
            from ..inference.role import InferenceRole

            inference = node.roles["inference"]
            engine = inference.engine if isinstance(inference, InferenceRole) else None
        if "metrics" in node.roles and settings.swarm:
            from ..metrics.role import MetricsRole

            metrics = node.roles["metrics"]
            collector = metrics.collector if isinstance(metrics, MetricsRole) else None
        if not settings.enabled or (engine is None and collector is None):
            return None
        return cls(node, settings, engine=engine, collector=collector)

    # -- running ---------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver hooks; on a worker, sample and autoscale every ``interval``."""
        async with trio.open_nursery() as nursery:
            if self.hooks.enabled:
                await nursery.start(self.hooks.run)
            if self.engine is not None:
                self.sample_once()
                nursery.start_soon(self._loop, nursery)
            task_status.started()

    async def _loop(self, nursery: trio.Nursery) -> None:
        while True:
            await trio.sleep(self.settings.interval)
            self.sample_once()
            if self.settings.autoscale:
                self._autoscale(nursery)

    def sample_once(self) -> list[TriggerEvent]:
        """Sample every model of the engine, evaluate the triggers, queue the
        hook for each change; returns the changes."""
        assert self.engine is not None
        now, wall = trio.current_time(), time.time()
        cpu = self.cpu()
        changes: list[TriggerEvent] = []
        for name, model in self.engine.models.items():
            window = self.windows.get(name)
            if window is None:
                window = self.windows[name] = FigureWindow(self.settings.window)
            window.add(Sample(now, float(model.waiting), float(model.in_flight), model.slots,
                              cpu, model.completed, model.latency_total))
            figures = self.figures[name] = window.figures()
            changes += self.evaluator.evaluate(name, figures, now=wall)
        self._announce(changes, wall)
        return changes

    def on_snapshot(self, snapshot: Any) -> None:
        """A collection round of the metrics role: evaluate the swarm scope."""
        try:
            self.evaluate_swarm(snapshot)
        except Exception:  # never break the collector
            log.exception("scaling: evaluating the swarm figures failed")

    def evaluate_swarm(self, snapshot: Any) -> list[TriggerEvent]:
        """Merge the figures workers report in ``snapshot`` per model and
        evaluate the triggers on them (scope ``swarm``)."""
        per_model: dict[str, list[Figures]] = {}
        for sample in snapshot.up_nodes():
            scaling = sample.health.get("scaling") if isinstance(sample.health, dict) else None
            models = scaling.get("models") if isinstance(scaling, dict) else None
            if not isinstance(models, dict):
                continue
            for name, entry in models.items():
                figures = Figures.from_dict(entry.get("figures")) \
                    if isinstance(entry, dict) else None
                if isinstance(name, str) and figures is not None \
                        and (name in per_model or len(per_model) < MAX_SWARM_MODELS):
                    per_model.setdefault(name, []).append(figures)
        wall = time.time()
        changes: list[TriggerEvent] = []
        merged = {name: aggregate(figs) for name, figs in per_model.items()}
        for name in sorted(set(self.swarm_figures) - set(merged)):
            changes += self.swarm_evaluator.forget(name, now=wall)
        self.swarm_figures = merged
        for name, figures in sorted(merged.items()):
            changes += self.swarm_evaluator.evaluate(name, figures, now=wall)
        self._announce(changes, wall)
        return changes

    def _announce(self, changes: list[TriggerEvent], wall: float) -> None:
        for event in changes:
            self.event_count.labels(event.scope, event.trigger, event.status).inc()
            log.warning("scaling trigger %s %s for model %s (%s): %s vs threshold %s",
                        event.trigger, event.status, event.model, event.scope,
                        "n/a" if event.value is None else f"{event.value:.4g}",
                        event.threshold)
            body = hook_body(event, node=self.node.peer_id, window=self.settings.window,
                             wall=wall)
            self.events = [*self.events[-19:], body]
            self.hooks.notify_nowait(body)

    # -- autoscaling -----------------------------------------------------------------------
    def _autoscale(self, nursery: trio.Nursery) -> None:
        assert self.engine is not None
        now = trio.current_time()
        for name, model in self.engine.models.items():
            if name in self._resizing:
                continue
            decision = decide(self.figures.get(name, Figures(samples=0)), slots=model.slots,
                              bounds=self.settings.bounds(name), settings=self.settings,
                              cpu_hot=self.evaluator.active(name, "cpu"), now=now,
                              last_change=self.last_change.get(name))
            if decision is not None and decision.slots != model.slots:
                self._resizing.add(name)
                nursery.start_soon(self._resize, name, decision.slots, decision.direction)

    async def _resize(self, name: str, slots: int, direction: str) -> None:
        assert self.engine is not None
        try:
            before = self.engine.models[name].slots
            after = await self.engine.resize(name, slots)
            if after != before:
                self.slot_changes.labels(cat.clean_label(name), direction).inc()
                log.info("autoscale: model %s %s from %d to %d slot(s)", name, direction,
                         before, after)
                self.node.invalidate_descriptor()
        except Exception as exc:
            log.warning("autoscale: cannot resize model %s to %d slot(s): %s", name, slots,
                        exc)
        finally:
            self.last_change[name] = trio.current_time()
            self.last_change_wall[name] = time.time()
            self._resizing.discard(name)

    # -- views ---------------------------------------------------------------------------
    def scopes(self) -> list[tuple[str, dict[str, Figures], TriggerEvaluator]]:
        """``(scope, figures by model, evaluator)`` of each scope this node runs."""
        out = []
        if self.engine is not None:
            out.append(("node", dict(self.figures), self.evaluator))
        if self.collector is not None:
            out.append(("swarm", dict(self.swarm_figures), self.swarm_evaluator))
        return out

    def status(self) -> dict[str, Any]:
        """For the node's health: thresholds, per-model figures and triggers
        (this worker's, and the swarm's on a metrics node), slots and bounds."""
        s = self.settings
        out: dict[str, Any] = {
            "interval": s.interval, "window": s.window,
            "thresholds": {t: s.threshold(t) for t in TRIGGERS},
            "autoscale": s.autoscale and self.engine is not None,
            "hook": {"command": bool(s.hook_command), "webhook": bool(s.hook_url),
                     **vars(self.hooks.statistics())},
        }
        if self.engine is not None:
            models = {}
            for name, model in self.engine.models.items():
                figures = self.figures.get(name, Figures(samples=0))
                bounds = s.bounds(name)
                models[name] = {
                    "figures": figures.to_dict(),
                    "triggers": self.evaluator.view(name),
                    "slots": model.slots,
                    "bounds": [bounds.min_slots, bounds.max_slots] if s.autoscale else None,
                    "last_change": self.last_change_wall.get(name),
                }
            out["models"] = models
        if self.collector is not None:
            out["swarm"] = {name: {"figures": f.to_dict(),
                                   "triggers": self.swarm_evaluator.view(name)}
                            for name, f in sorted(self.swarm_figures.items())}
        return out
