"""Prometheus metrics of the ledger, on the node's own registry.

Label values are bounded: ``kind`` is one of the event kinds, ``reason`` one
of :data:`REJECT_REASONS`, ``source`` one of ``local``, ``gossip``, ``sync``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..errors import (
    BadSignature,
    InvalidEvent,
    KindNotAllowed,
    LedgerError,
    ReplayedEvent,
    UnauthorizedAuthor,
    WrongNetwork,
)

__all__ = ["LedgerMetrics", "REJECT_REASONS", "reason_of"]

REJECT_REASONS = ("malformed", "bad_signature", "wrong_network", "not_member",
                  "kind_not_allowed", "replayed", "other")


def reason_of(error: LedgerError) -> str:
    """The metric label for a rejection."""
    if isinstance(error, KindNotAllowed):
        return "kind_not_allowed"
    if isinstance(error, UnauthorizedAuthor):
        return "not_member"
    if isinstance(error, InvalidEvent):
        return "malformed"
    if isinstance(error, BadSignature):
        return "bad_signature"
    if isinstance(error, WrongNetwork):
        return "wrong_network"
    if isinstance(error, ReplayedEvent):
        return "replayed"
    return "other"


class LedgerMetrics:
    """The ledger's counters, gauges and histograms."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.applied = Counter("ai_platform_ledger_events_applied",
                               "Ledger events applied to the local store", ["kind", "source"],
                               registry=r)
        self.rejected = Counter("ai_platform_ledger_events_rejected",
                                "Ledger events refused, by reason", ["reason"], registry=r)
        self.duplicates = Counter("ai_platform_ledger_events_duplicate",
                                  "Ledger events received again (ignored)", registry=r)
        self.held = Gauge("ai_platform_ledger_events_held",
                          "Events waiting for an earlier event of their author", registry=r)
        self.behind = Gauge("ai_platform_ledger_events_behind",
                            "Events peers had that this node lacked, at the last sync",
                            registry=r)
        self.lag = Histogram("ai_platform_ledger_replication_lag_seconds",
                             "Time from an event's creation on its author to its "
                             "application here (wall clocks of two machines)",
                             buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                                      60, 300, 3600, float("inf")),
                             registry=r)
        self.syncs = Counter("ai_platform_ledger_sync_rounds",
                             "Anti-entropy rounds, by outcome", ["outcome"], registry=r)
        self.gossip_dropped = Counter("ai_platform_ledger_gossip_dropped",
                                      "Events not published because the gossip queue was full",
                                      registry=r)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)

    def reject(self, error: LedgerError) -> str:
        reason = reason_of(error)
        self.rejected.labels(reason).inc()
        return reason

    def rejected_count(self, reason: str) -> float:
        """The current value of the rejection counter for ``reason``."""
        value = self.registry.get_sample_value(
            "ai_platform_ledger_events_rejected_total", {"reason": reason})
        return value or 0.0
