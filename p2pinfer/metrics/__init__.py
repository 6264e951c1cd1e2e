"""Metrics: node-wide Prometheus metrics, the swarm view, alerts, health.

- ``catalogue.py``: every metric name, label set and label-value rule in one
  place; the cardinality caps (:class:`BoundedLabels`) and the validation of
  ``recordMetric`` (:func:`validate_record`).
- ``node_metrics.py``: :class:`NodeMetrics` (``node.metrics`` on every node):
  request, latency, token, user, rate-limit, lag, peer and process metrics on
  the node's registry, the RPC observer, and ``getNodeMetrics``.
- ``samples.py``: metric families on the wire, per-node and swarm snapshots,
  and the swarm-wide exposition with a ``node`` label (sans-IO).
- ``collector.py``: :class:`ClusterCollector`, which asks every member node
  for its metrics with a per-node timeout.
- ``alerts.py``: the alert rules (PromQL and built-in twins), counter
  history, the fire/resolve evaluator, and the rule-file renderer.
- ``alerts.yml``: the rendered Prometheus rule file (``promtool check rules``).
- ``webhook.py``: Alertmanager-style JSON notifications on fire and resolve.
- ``exporter.py``: the Starlette app (``/metrics``, ``/health``, ``/alerts``)
  served by Hypercorn on trio.
- ``audit.py``: the query side of the audit trail (``getAuditLog``).
- ``settings.py``: the ``[metrics]`` table (``METRICS_ENABLED``,
  ``PROMETHEUS_PORT``).
- ``role.py``: :class:`~p2pinfer.metrics.role.MetricsRole` and its RPC
  methods (``recordMetric``, ``getMetrics``, ``getSystemHealth``,
  ``getAuditLog``).

Importing this package does not import the HTTP stack: the role module
(Starlette, Hypercorn, httpx) is imported only on nodes that hold the role.
See ``docs/metrics.md`` for the catalogue, caps, alerts and scrape config.
"""

from __future__ import annotations

from .catalogue import RECORDABLE as RECORDABLE
from .catalogue import BoundedLabels as BoundedLabels
from .catalogue import validate_record as validate_record
from .node_metrics import NodeMetrics as NodeMetrics
from .settings import MetricsSettings as MetricsSettings

__all__ = ["RECORDABLE", "BoundedLabels", "MetricsSettings", "NodeMetrics", "validate_record"]
