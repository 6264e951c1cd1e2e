"""Process-wide tuning for a long-running node process.

A node keeps many long-lived objects (imported modules, protobuf descriptors,
the model catalogue, connection state), and under load it churns through
short-lived ones (frames, chunks, cancel scopes). With CPython's default
collector settings the churn triggers full (generation 2) collections every
few seconds, and each one walks every long-lived object while the event loop
waits: 45-72 ms pauses measured on a gateway at 64 requests in flight, which
made the p99 latency (benchmarks/RESULTS.md, "Gateway").

:func:`tune_gc` is called by the daemon and by ``p2pinfer up`` once the node
serves. It is not called on import: an application embedding p2pinfer owns
its own process settings and may call it itself.
"""

from __future__ import annotations

import gc
import logging

__all__ = ["tune_gc", "GC_THRESHOLDS"]

log = logging.getLogger(__name__)

# gen0 collections every 20,000 net allocations (default 700): at that size
# almost every per-request object is already dead when the collector runs,
# so little is promoted and full collections become rare.
GC_THRESHOLDS = (20_000, 20, 20)


def tune_gc(thresholds: tuple[int, int, int] = GC_THRESHOLDS) -> None:
    """Freeze what exists now (startup objects leave the collector's view:
    they are never freed anyway) and raise the collection thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
    log.debug("gc tuned: %d objects frozen, thresholds %s", gc.get_freeze_count(), thresholds)
