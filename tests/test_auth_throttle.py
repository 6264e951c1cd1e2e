"""Sliding-window throttling (sans-IO, explicit clock)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pinfer.credentials.throttle import SlidingWindow, retry_after


def test_limit_kicks_in_at_the_count_and_lifts_after_the_window() -> None:
    w = SlidingWindow(3, 10.0)
    for t in (0.0, 1.0, 2.0):
        assert w.retry_after("k", t) is None
        w.hit("k", t)
    assert w.retry_after("k", 2.5) == pytest.approx(7.5)  # the oldest hit leaves at 10
    assert w.retry_after("other", 2.5) is None
    assert w.retry_after("k", 9.99) == pytest.approx(0.01)
    assert w.retry_after("k", 10.0) is None
    w.hit("k", 10.0)
    assert w.retry_after("k", 10.5) == pytest.approx(0.5)  # hits at 1, 2, 10: 1 leaves at 11
    w.reset("k")
    assert w.retry_after("k", 10.5) is None


def test_memory_is_bounded() -> None:
    w = SlidingWindow(2, 10.0, max_keys=100)
    for i in range(1000):
        w.hit(f"k{i}", float(i) / 1000)
    assert len(w) == 100
    assert w.count("k999", 1.0) == 1 and w.count("k0", 1.0) == 0
    assert w.prune(100.0) == 100 and len(w) == 0


@given(st.lists(st.floats(0, 100, allow_nan=False), max_size=30), st.integers(1, 6),
       st.floats(0.5, 50), st.floats(0, 200, allow_nan=False))
def test_retry_after_is_exact(times: list[float], limit: int, window: float, now: float) -> None:
    """Waiting the answer, and not a moment less, brings the count in the
    window below the limit."""
    times = [t for t in times if t <= now]
    wait = retry_after(times, limit, window, now)

    def in_window(at: float) -> int:
        return sum(1 for t in times if t > at - window)

    if wait is None:
        assert in_window(now) < limit
    else:
        assert in_window(now) >= limit
        assert in_window(now + wait + 1e-9) < limit  # (float rounding of t + window - now)
        if wait > 1e-6:
            assert in_window(now + wait * 0.999) >= limit
