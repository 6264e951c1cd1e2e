"""Scaling triggers over a window of samples (sans-IO: no clock, no I/O).

A :class:`Sample` is one observation of one model on one worker: requests
waiting for a slot, slots in use, slots, the host's CPU use, and the
cumulative count and total duration of finished requests. A
:class:`FigureWindow` keeps the samples of the last ``window`` seconds and
turns them into :class:`Figures`:

- ``cpu_percent``, ``queue_depth``, ``in_flight``: means over the window;
- ``avg_response_time``: seconds per request finished in the window (the
  increase of the total duration over the increase of the count, as
  Prometheus' ``rate(sum) / rate(count)``), None if none finished;
- ``slots``: the newest value.

:class:`TriggerEvaluator` compares each figure with its threshold (the
documented defaults, CPU > 80 %, queue depth > 100, average response time >
5 s) and reports :class:`TriggerEvent` transitions: ``fired`` when a figure
goes above its threshold, ``cleared`` when a fired one drops to
``threshold * (1 - hysteresis)`` or below (so a figure hovering at the
threshold does not flap). A response time that cannot be measured (nothing
finished in the window) keeps its state unless the model is idle.

:func:`aggregate` merges the figures of several workers of one model into
the swarm's figures for that model (queues and slots summed, CPU averaged,
response time weighted by requests).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .settings import TRIGGERS, ScalingSettings

__all__ = ["FigureWindow", "Figures", "Sample", "TriggerEvaluator", "TriggerEvent",
           "aggregate"]

_IDLE = 1e-9


@dataclass(frozen=True)
class Sample:
    """One observation of one model (``at``: monotonic seconds)."""

    at: float
    queue_depth: float
    in_flight: float
    slots: int
    cpu_percent: float | None
    completed: int
    latency_total: float


@dataclass(frozen=True)
class Figures:
    """What the triggers compare, for one model over the window."""

    cpu_percent: float | None = None
    queue_depth: float = 0.0
    in_flight: float = 0.0
    slots: int = 0
    avg_response_time: float | None = None
    completed: int = 0
    samples: int = 0
    workers: int = 1

    def value(self, trigger: str) -> float | None:
        """The figure ``trigger`` (one of :data:`~.settings.TRIGGERS`) looks at."""
        if trigger == "cpu":
            return self.cpu_percent
        if trigger == "queue_depth":
            return self.queue_depth
        if trigger == "response_time":
            return self.avg_response_time
        raise KeyError(trigger)

    @property
    def idle(self) -> bool:
        return self.queue_depth <= _IDLE and self.in_flight <= _IDLE

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, rounded (hook bodies, health)."""
        return {
            "cpu_percent": _round(self.cpu_percent, 1),
            "queue_depth": round(self.queue_depth, 2),
            "in_flight": round(self.in_flight, 2),
            "slots": self.slots,
            "avg_response_time": _round(self.avg_response_time, 4),
            "completed": self.completed,
            "samples": self.samples,
            "workers": self.workers,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Figures | None:
        """Figures reported by another node (None if malformed)."""
        if not isinstance(data, dict):
            return None
        try:
            return cls(
                cpu_percent=_opt_float(data.get("cpu_percent")),
                queue_depth=float(data.get("queue_depth") or 0.0),
                in_flight=float(data.get("in_flight") or 0.0),
                slots=int(data.get("slots") or 0),
                avg_response_time=_opt_float(data.get("avg_response_time")),
                completed=int(data.get("completed") or 0),
                samples=int(data.get("samples") or 0),
                workers=int(data.get("workers") or 1),
            )
        except (TypeError, ValueError):
            return None


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _opt_float(value: Any) -> float | None:
    if value is None:
        return None
    out = float(value)
    return out if math.isfinite(out) else None


class FigureWindow:
    """The samples of one model over the last ``window`` seconds.

    Args:
        window: seconds of samples averaged (plus one older sample kept as
            the baseline of the cumulative counters).
    """

    def __init__(self, window: float) -> None:
        if window <= 0:
            raise ValueError("window must be > 0")
        self.window = window
        self._samples: deque[Sample] = deque()

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, sample: Sample) -> None:
        """Add a sample (older than the newest: ignored) and drop expired ones."""
        if self._samples and sample.at < self._samples[-1].at:
            return
        self._samples.append(sample)
        cutoff = sample.at - self.window
        while len(self._samples) >= 2 and self._samples[1].at <= cutoff:
            self._samples.popleft()

    def figures(self) -> Figures:
        """The window's figures (zeros before the first sample)."""
        if not self._samples:
            return Figures(samples=0)
        newest = self._samples[-1]
        cutoff = newest.at - self.window
        inside = [s for s in self._samples if s.at > cutoff] or [newest]
        cpus = [s.cpu_percent for s in inside if s.cpu_percent is not None]
        base = self._samples[0]
        completed = newest.completed - base.completed
        spent = newest.latency_total - base.latency_total
        if completed < 0 or spent < 0:  # the counters restarted
            completed, spent = newest.completed, newest.latency_total
        return Figures(
            cpu_percent=sum(cpus) / len(cpus) if cpus else None,
            queue_depth=sum(s.queue_depth for s in inside) / len(inside),
            in_flight=sum(s.in_flight for s in inside) / len(inside),
            slots=newest.slots,
            avg_response_time=spent / completed if completed > 0 and base is not newest
            else None,
            completed=completed if base is not newest else 0,
            samples=len(inside),
        )


def aggregate(figures: Iterable[Figures]) -> Figures:
    """The swarm's figures of one model from its workers' figures."""
    items = list(figures)
    if not items:
        return Figures(workers=0)
    cpus = [f.cpu_percent for f in items if f.cpu_percent is not None]
    timed = [(f.avg_response_time, f.completed) for f in items
             if f.avg_response_time is not None and f.completed > 0]
    done = sum(n for _avg, n in timed)
    response = sum(avg * n for avg, n in timed) / done if done else None
    return Figures(
        cpu_percent=sum(cpus) / len(cpus) if cpus else None,
        queue_depth=sum(f.queue_depth for f in items),
        in_flight=sum(f.in_flight for f in items),
        slots=sum(f.slots for f in items),
        avg_response_time=response,
        completed=sum(f.completed for f in items),
        samples=min(f.samples for f in items),
        workers=sum(f.workers for f in items),
    )


@dataclass(frozen=True)
class TriggerEvent:
    """A trigger of one model that fired or cleared."""

    status: str  # "fired" | "cleared"
    trigger: str
    model: str
    value: float | None
    threshold: float
    figures: Figures
    scope: str = "node"


@dataclass
class TriggerState:
    """Whether one trigger of one model is active, and since when."""

    active: bool = False
    since: float | None = None
    value: float | None = None


@dataclass
class TriggerEvaluator:
    """Fires and clears triggers per model (see the module docstring).

    Args:
        settings: thresholds and hysteresis.
        scope: ``node`` (a worker's own models) or ``swarm``.
    """

    settings: ScalingSettings
    scope: str = "node"
    states: dict[tuple[str, str], TriggerState] = field(default_factory=dict)

    def evaluate(self, model: str, figures: Figures, *, now: float) -> list[TriggerEvent]:
        """Compare ``figures`` of ``model`` with every threshold at time ``now``
        (wall-clock seconds, kept as ``since``); returns the transitions."""
        out: list[TriggerEvent] = []
        for trigger in TRIGGERS:
            threshold = self.settings.threshold(trigger)
            value = figures.value(trigger)
            state = self.states.setdefault((model, trigger), TriggerState())
            state.value = value
            if not state.active:
                if value is not None and value > threshold:
                    state.active, state.since = True, now
                    out.append(TriggerEvent("fired", trigger, model, value, threshold,
                                            figures, self.scope))
                continue
            if value is None:
                clear = figures.idle
            else:
                clear = value <= threshold * (1.0 - self.settings.hysteresis)
            if clear:
                state.active, state.since = False, None
                out.append(TriggerEvent("cleared", trigger, model, value, threshold,
                                        figures, self.scope))
        return out

    def forget(self, model: str, *, now: float) -> list[TriggerEvent]:
        """``model`` is gone (no worker reports it): clear its active triggers."""
        out = []
        for trigger in TRIGGERS:
            state = self.states.pop((model, trigger), None)
            if state is not None and state.active:
                out.append(TriggerEvent("cleared", trigger, model, None,
                                        self.settings.threshold(trigger), Figures(workers=0),
                                        self.scope))
        return out

    def models(self) -> list[str]:
        return sorted({m for m, _t in self.states})

    def active(self, model: str, trigger: str) -> bool:
        state = self.states.get((model, trigger))
        return state is not None and state.active

    def view(self, model: str) -> dict[str, dict[str, Any]]:
        """``{trigger: {active, since, value, threshold}}`` of ``model``."""
        out = {}
        for trigger in TRIGGERS:
            state = self.states.get((model, trigger)) or TriggerState()
            out[trigger] = {"active": state.active, "since": state.since,
                            "value": _round(state.value, 4),
                            "threshold": self.settings.threshold(trigger)}
        return out
