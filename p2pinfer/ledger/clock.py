"""A hybrid logical clock (HLC) for ledger event timestamps.

An HLC timestamp is one integer: milliseconds since the Unix epoch in the
high bits and a 16-bit logical counter in the low bits::

    hlc = (wall_ms << 16) | counter

Timestamps issued by one clock strictly increase, stay close to wall-clock
time, and move past every timestamp the clock has *observed* from other
nodes, so an event always sorts after the events its author had seen. The
ordering rules of the ledger (registration conflicts, last-writer-wins
fields) compare ``(hlc, author, seq)``, which is a total order.

A remote timestamp more than :data:`MAX_DRIFT_MS` ahead of the local wall
clock is not adopted: one node with a wrong clock must not drag the others
into the future.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["HybridClock", "MAX_DRIFT_MS", "hlc_from_wall", "wall_of"]

COUNTER_BITS = 16
MAX_DRIFT_MS = 60_000


def hlc_from_wall(seconds: float) -> int:
    """The first HLC timestamp of a wall-clock instant (counter 0)."""
    return int(seconds * 1000) << COUNTER_BITS


def wall_of(hlc: int) -> float:
    """The wall-clock part of an HLC timestamp, in seconds since the epoch."""
    return (hlc >> COUNTER_BITS) / 1000.0


class HybridClock:
    """Issues strictly increasing HLC timestamps.

    Args:
        wall: the wall clock in seconds (``time.time``; injectable for tests).
        last: the highest timestamp already issued or observed (after a
            restart: the highest one in the store).
    """

    def __init__(self, wall: Callable[[], float] = time.time, last: int = 0) -> None:
        self._wall = wall
        self.last = last

    def now(self) -> int:
        """A new timestamp, greater than every one issued or observed so far."""
        physical = hlc_from_wall(self._wall())
        self.last = physical if physical > self.last else self.last + 1
        return self.last

    def observe(self, remote: int) -> None:
        """Move past a timestamp seen on another node's event."""
        if remote <= self.last:
            return
        limit_ms = int(self._wall() * 1000) + MAX_DRIFT_MS
        if (remote >> COUNTER_BITS) <= limit_ms:
            self.last = remote
