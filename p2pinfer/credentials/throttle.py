"""Sliding-window counters for throttling (sans-IO: the caller passes ``now``).

:class:`SlidingWindow` remembers, per key, the times of recent hits and says
whether one more would exceed ``limit`` hits within ``window`` seconds, and
when that stops being true. The auth role uses one for failed logins per
source and one for registrations per source; failed logins per *account*
are counted from the replicated audit trail instead (see
:mod:`p2pinfer.auth.service`), so that limit holds across auth nodes.

Memory is bounded: at most ``max_keys`` keys (the stalest are dropped first)
and ``limit`` times per key.
"""

from __future__ import annotations

from collections import deque

__all__ = ["SlidingWindow", "retry_after"]


def retry_after(times: list[float], limit: int, window: float, now: float) -> float | None:
    """Seconds until fewer than ``limit`` of ``times`` fall within ``window``
    of the current time, or None if that is already so.

    ``times`` are hit times, in any order; only the newest ``limit`` matter.
    """
    recent = sorted((t for t in times if t > now - window), reverse=True)
    if len(recent) < limit:
        return None
    # The limit-th newest hit must leave the window before one more is allowed.
    return max(0.0, recent[limit - 1] + window - now)


class SlidingWindow:
    """At most ``limit`` hits per key within any ``window`` seconds.

    Args:
        limit: hits allowed within a window.
        window: the window, in seconds.
        max_keys: keys remembered at once.
    """

    def __init__(self, limit: int, window: float, *, max_keys: int = 100_000) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._hits: dict[str, deque[float]] = {}

    def __len__(self) -> int:
        return len(self._hits)

    def retry_after(self, key: str, now: float) -> float | None:
        """Seconds until ``key`` may be hit again, or None if it may be now."""
        hits = self._hits.get(key)
        if hits is None:
            return None
        return retry_after(list(hits), self.limit, self.window, now)

    def count(self, key: str, now: float) -> int:
        """Hits of ``key`` within the window ending at ``now``."""
        hits = self._hits.get(key)
        return 0 if hits is None else sum(1 for t in hits if t > now - self.window)

    def hit(self, key: str, now: float) -> None:
        """Record one hit of ``key`` at ``now``."""
        hits = self._hits.pop(key, None)
        if hits is None:
            hits = deque(maxlen=self.limit)
            if len(self._hits) >= self.max_keys:
                self.prune(now)
                while len(self._hits) >= self.max_keys:
                    # dicts keep insertion order; re-inserted on every hit, so
                    # the first key is the one hit longest ago
                    del self._hits[next(iter(self._hits))]
        hits.append(now)
        self._hits[key] = hits

    def reset(self, key: str) -> None:
        """Forget ``key`` (e.g. after a successful login)."""
        self._hits.pop(key, None)

    def prune(self, now: float) -> int:
        """Drop keys with no hit in the window; returns how many."""
        stale = [k for k, hits in self._hits.items() if not hits or hits[-1] <= now - self.window]
        for key in stale:
            del self._hits[key]
        return len(stale)
