"""Scaling: the auto-scaling triggers (CPU, queue depth, response time), a hook for an
orchestrator, and slot autoscaling on workers.

Files:

- ``settings.py``: the ``[scaling]`` table (thresholds, window, hook,
  autoscaling bounds) and its environment variables;
- ``triggers.py``: windows of samples, figures, the fire / clear evaluator,
  the swarm aggregation (sans-IO);
- ``autoscale.py``: when a worker grows or shrinks a model's slots (sans-IO);
- ``hooks.py``: the hook body, the command and webhook runner;
- ``monitor.py``: :class:`Scaling`, what the node runs: sampling, triggers,
  hooks, autoscaling, metrics and the health view.

The node builds it (``node.scaling = Scaling.for_node(node)``) after its
roles and starts it with them. The triggers (CPU > 80 %, request queue depth
> 100, average response time > 5 s by default) are evaluated per model: on
each worker over its own models, and on a metrics node over the whole
swarm. See ``docs/deployment.md`` (Scaling) for the hook contract.
"""

from __future__ import annotations

from .monitor import Scaling as Scaling
from .settings import TRIGGERS as TRIGGERS
from .settings import ScalingSettings as ScalingSettings
from .settings import SlotBounds as SlotBounds
from .triggers import Figures as Figures
from .triggers import TriggerEvent as TriggerEvent

__all__ = ["TRIGGERS", "Figures", "Scaling", "ScalingSettings", "SlotBounds", "TriggerEvent"]
