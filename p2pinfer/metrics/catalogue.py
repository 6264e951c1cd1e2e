"""The metric catalogue: names, label sets, label-value rules and caps (sans-IO).

Every metric the metrics package owns is named here once, so that the node's
collectors, ``recordMetric`` validation, the alert rules and the docs agree.
Label values are bounded two ways:

- a **shape**: ids and names must match :data:`LABEL_VALUE` (at most
  :data:`MAX_LABEL_LENGTH` printable characters, no spaces or quotes), and
  ``service`` / ``status`` come from the fixed sets :data:`SERVICES` and
  :data:`STATUSES`;
- a **cap** on distinct label sets per metric (:class:`BoundedLabels`). In
  process, a label set past the cap is folded into the overflow bucket
  ``_other`` so that a caller (the gateway) never fails because of metrics;
  over RPC (``recordMetric``) it is refused with ``InvalidParams``.

:func:`validate_record` checks the parameters of ``recordMetric`` against
:data:`RECORDABLE`, the metrics a remote member may record.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import InvalidParams

__all__ = [
    "ACCESS_REFUSED",
    "DIALS",
    "ACTIVE_USERS",
    "ACTIVE_USER_WINDOWS",
    "ALERTS_FIRING",
    "BoundedLabels",
    "CONNECTED_PEERS",
    "ERROR_STATUSES",
    "LABEL_VALUE",
    "MAX_LABEL_LENGTH",
    "MODEL_WORKERS",
    "NODE_INFO",
    "NODE_UP",
    "OTHER",
    "PROCESS_CPU_PERCENT",
    "RATE_LIMIT_VIOLATIONS",
    "RECORDABLE",
    "LEDGER_BEHIND",
    "LEDGER_LAG",
    "REQUESTS",
    "REQUEST_DURATION",
    "REQUEST_DURATION_BUCKETS",
    "RPC_DURATION",
    "RPC_DURATION_BUCKETS",
    "RecordSpec",
    "SERVICES",
    "STATUSES",
    "TOKENS_USED",
    "clean_label",
    "validate_record",
]

# -- names (as exposed; counters end in _total) ----------------------------------
REQUESTS = "ai_platform_requests_total"
REQUEST_DURATION = "ai_platform_request_duration_seconds"
RPC_DURATION = "ai_platform_rpc_duration_seconds"
TOKENS_USED = "ai_platform_tokens_used_total"
ACTIVE_USERS = "ai_platform_active_users"
RATE_LIMIT_VIOLATIONS = "ai_platform_rate_limit_violations_total"
# Descriptors, pubsub streams, RPC calls and connections refused to peers
# that are not members or lack a grant (layer, reason: fixed sets).
ACCESS_REFUSED = "ai_platform_access_refused_total"
# Outgoing libp2p connection attempts by outcome (ok, failed): a node that
# keeps dialling peers that left shows as failures that never stop.
DIALS = "ai_platform_libp2p_dials_total"
# Owned by the ledger (p2pinfer.ledger.metrics), read here: time from an event's
# creation on its author to its application on this node, and events missing.
LEDGER_LAG = "ai_platform_ledger_replication_lag_seconds"
LEDGER_BEHIND = "ai_platform_ledger_events_behind"
CONNECTED_PEERS = "ai_platform_connected_peers"
PROCESS_CPU_PERCENT = "ai_platform_process_cpu_percent"
NODE_INFO = "ai_platform_node_info"
# Swarm-level series, computed by a node with the metrics role.
NODE_UP = "ai_platform_node_up"
MODEL_WORKERS = "ai_platform_model_workers"
ALERTS_FIRING = "ai_platform_alerts_firing"

REQUEST_DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
                            120.0)
RPC_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)

# ``time_window`` values of ai_platform_active_users, with their length in seconds.
ACTIVE_USER_WINDOWS: dict[str, float] = {"5m": 300.0, "1h": 3600.0, "24h": 86400.0}

SERVICES = frozenset({"auth", "gateway", "inference", "metrics", "web", "node", "ledger",
                      "cli", "client", "_other", "_unknown"})
STATUSES = frozenset({"success", "error", "timeout", "cancelled", "denied", "unknown",
                      "rate_limited", "client_error"})
# What the error-rate alert counts as a failed request.
ERROR_STATUSES = frozenset({"error", "timeout"})

OTHER = "_other"
MAX_LABEL_LENGTH = 100
LABEL_VALUE = re.compile(rf"^[A-Za-z0-9_][A-Za-z0-9_.:/@+=-]{{0,{MAX_LABEL_LENGTH - 1}}}$")


def clean_label(value: object, *, fallback: str = "_invalid") -> str:
    """``value`` if it is an acceptable label value, else ``fallback``."""
    if isinstance(value, str) and LABEL_VALUE.match(value):
        return value
    return fallback


class BoundedLabels:
    """Remembers at most ``cap`` distinct label tuples of one metric.

    Args:
        cap: how many distinct label sets are admitted.
        width: how many labels a tuple has (for the overflow tuple).
    """

    def __init__(self, cap: int, width: int) -> None:
        self.cap = cap
        self.overflow = (OTHER,) * width
        self._seen: set[tuple[str, ...]] = set()
        self.folded = 0

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, key: object) -> bool:
        return key in self._seen

    def admit(self, key: tuple[str, ...]) -> tuple[str, ...]:
        """``key`` if known or there is room, else the overflow tuple."""
        if key in self._seen:
            return key
        if len(self._seen) < self.cap:
            self._seen.add(key)
            return key
        self.folded += 1
        return self.overflow

    def admit_strict(self, key: tuple[str, ...], metric: str) -> tuple[str, ...]:
        """``key`` if known or there is room.

        Raises:
            InvalidParams: the cap is reached and ``key`` is new.
        """
        if key in self._seen or len(self._seen) < self.cap:
            self._seen.add(key)
            return key
        raise InvalidParams(
            f"labels: too many label values for {metric}: it already has {self.cap} distinct "
            "label sets (the cardinality cap)", data={"field": "labels", "cap": self.cap})


@dataclass(frozen=True)
class RecordSpec:
    """A metric that ``recordMetric`` may record.

    Attributes:
        name: the exposed name.
        kind: ``counter`` (value added, must be >= 0), ``histogram`` (value
            observed, must be >= 0) or ``gauge`` (value set).
        labels: the exact label names, in order.
        choices: label names whose values must come from a fixed set.
    """

    name: str
    kind: Literal["counter", "histogram", "gauge"]
    labels: tuple[str, ...]
    choices: Mapping[str, frozenset[str]] = field(default_factory=dict)


RECORDABLE: dict[str, RecordSpec] = {
    spec.name: spec
    for spec in (
        RecordSpec(REQUESTS, "counter", ("service", "method", "status"),
                   {"service": SERVICES, "status": STATUSES}),
        RecordSpec(REQUEST_DURATION, "histogram", ("service", "model"), {"service": SERVICES}),
        RecordSpec(TOKENS_USED, "counter", ("service", "model"), {"service": SERVICES}),
        RecordSpec(RATE_LIMIT_VIOLATIONS, "counter", ("user_id", "api_key_id")),
    )
}


def validate_record(params: Any) -> tuple[RecordSpec, float, tuple[str, ...]]:
    """Check ``recordMetric`` parameters.

    ``params`` is ``{"metricName": str, "value": number, "labels": {name: value}}``
    (``labels`` may be omitted for a metric without labels) or the positional
    form ``[metricName, value, labels]``.

    Returns:
        the spec, the value as a float and the label values in spec order.

    Raises:
        InvalidParams: unknown metric, wrong label names, a bad label value, a
            non-finite or negative value; ``data.field`` names the culprit.
    """
    if isinstance(params, list | tuple) and len(params) in (2, 3):
        params = {"metricName": params[0], "value": params[1],
                  "labels": params[2] if len(params) == 3 else {}}
    if not isinstance(params, dict):
        raise InvalidParams("params: recordMetric takes {metricName, value, labels}",
                            data={"field": "params"})
    extra = set(params) - {"metricName", "value", "labels"}
    if extra:
        key = sorted(map(str, extra))[0]
        raise InvalidParams(f"{key}: unknown key", data={"field": key})
    name = params.get("metricName")
    spec = RECORDABLE.get(name) if isinstance(name, str) else None
    if spec is None:
        known = ", ".join(sorted(RECORDABLE))
        shown = name[:80] if isinstance(name, str) else repr(name)[:80]
        raise InvalidParams(f"metricName: unknown metric {shown!r} (recordable: {known})",
                            data={"field": "metricName"})
    value = params.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidParams(f"value: must be a number, got {type(value).__name__}",
                            data={"field": "value"})
    value = float(value)
    if not math.isfinite(value):
        raise InvalidParams(f"value: must be finite, got {value}", data={"field": "value"})
    if spec.kind in ("counter", "histogram") and value < 0:
        raise InvalidParams(f"value: {spec.name} is a {spec.kind}; the value must be >= 0",
                            data={"field": "value"})
    labels = params.get("labels", {})
    if labels is None:
        labels = {}
    if not isinstance(labels, dict):
        raise InvalidParams("labels: must be a map of label name to value",
                            data={"field": "labels"})
    if set(labels) != set(spec.labels):
        want = ", ".join(spec.labels) or "none"
        got = ", ".join(sorted(map(str, labels))) or "none"
        raise InvalidParams(f"labels: {spec.name} takes labels {want}; got {got}",
                            data={"field": "labels"})
    out = []
    for key in spec.labels:
        raw = labels[key]
        if not isinstance(raw, str) or not LABEL_VALUE.match(raw):
            raise InvalidParams(
                f"labels.{key}: must be 1-{MAX_LABEL_LENGTH} characters of letters, digits "
                "and _.:/@+=- (an id or a name, never free text)",
                data={"field": f"labels.{key}"})
        allowed = spec.choices.get(key)
        if allowed is not None and raw not in allowed:
            raise InvalidParams(f"labels.{key}: must be one of {', '.join(sorted(allowed))}",
                                data={"field": f"labels.{key}"})
        out.append(raw)
    return spec, value, tuple(out)
