"""When a worker grows or shrinks a model's slots (sans-IO).

:func:`decide` looks at one model's window figures and returns the slot
count to move to, or None:

1. outside its bounds (``min_slots`` .. ``max_slots``): back inside, at once;
2. within ``cooldown`` seconds of the last change: nothing;
3. **grow** when the mean queue over the window is above
   ``grow_queue_depth`` and the CPU trigger is not active (more slots on a
   saturated CPU only slow every request down): enough slots to absorb the
   mean queue, at most ``max_slots``;
4. **shrink** by one when nothing waited during the window and the mean
   busy slots are below ``shrink_utilization`` of the slots, down to
   ``min_slots``.

The engine applies the change without dropping work (:mod:`p2pinfer.inference.slots`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .settings import ScalingSettings, SlotBounds
from .triggers import Figures

__all__ = ["SlotDecision", "decide"]


@dataclass(frozen=True)
class SlotDecision:
    """Move a model to ``slots``; ``reason`` is ``bounds``, ``queue`` or ``idle``."""

    slots: int
    reason: str

    @property
    def direction(self) -> str:
        return "grow" if self.reason == "queue" else "shrink" if self.reason == "idle" \
            else "bounds"


def decide(figures: Figures, *, slots: int, bounds: SlotBounds, settings: ScalingSettings,
           cpu_hot: bool, now: float, last_change: float | None) -> SlotDecision | None:
    """The slot change for one model, or None (see the module docstring).

    Args:
        figures: the model's figures over the window.
        slots: its slots now.
        bounds: its autoscaling bounds.
        settings: ``grow_queue_depth``, ``shrink_utilization``, ``cooldown``.
        cpu_hot: the CPU trigger of this model is active.
        now: monotonic seconds.
        last_change: when its slots last changed (monotonic), or None.
    """
    clamped = bounds.clamp(slots)
    if clamped != slots:
        return SlotDecision(clamped, "bounds")
    if figures.samples == 0:
        return None
    if last_change is not None and now - last_change < settings.cooldown:
        return None
    if figures.queue_depth > settings.grow_queue_depth and not cpu_hot \
            and slots < bounds.max_slots:
        wanted = slots + max(1, math.ceil(figures.queue_depth))
        return SlotDecision(min(bounds.max_slots, wanted), "queue")
    if figures.queue_depth <= 1e-9 and slots > bounds.min_slots \
            and figures.in_flight < slots * settings.shrink_utilization:
        return SlotDecision(slots - 1, "idle")
    return None
