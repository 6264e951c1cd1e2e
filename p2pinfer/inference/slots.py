"""A resizable pool of generation slots (first come, first served).

:class:`SlotPool` is a counting semaphore whose capacity can change while
requests hold and wait for slots, which is what lets a worker grow and
shrink a model's slots at run time (``[scaling] autoscale``):

- **growing** hands the new slots to the longest-waiting requests at once;
- **shrinking** never takes a slot away from a request that holds one: the
  pool just stops handing slots out until enough holders have released
  theirs (``in_use`` may stay above ``capacity`` for a while, never the
  other way round).

Waiters are served strictly in arrival order (a slot freed while others
wait is handed over directly, so a newcomer cannot jump the queue), and a
waiter cancelled before it got a slot leaves no trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

__all__ = ["SlotPool", "SlotPoolStatistics"]


@dataclass(frozen=True)
class SlotPoolStatistics:
    """A snapshot of a :class:`SlotPool`."""

    capacity: int
    in_use: int
    waiting: int

    @property
    def free(self) -> int:
        """Slots that could be handed out now (0 while shrinking)."""
        return max(0, self.capacity - self.in_use)


class SlotPool:
    """A FIFO semaphore with a capacity that may change (see the module docstring).

    Args:
        capacity: slots at first (>= 1).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._capacity = capacity
        self._in_use = 0
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def free(self) -> int:
        return max(0, self._capacity - self._in_use)

    def statistics(self) -> SlotPoolStatistics:
        return SlotPoolStatistics(self._capacity, self._in_use, len(self._lot))

    def acquire_nowait(self) -> None:
        """Take a slot if one is free and nobody waits for one.

        Raises:
            trio.WouldBlock: no free slot (or others are first in line).
        """
        if self._in_use >= self._capacity or len(self._lot):
            raise trio.WouldBlock
        self._in_use += 1

    async def acquire(self) -> None:
        """Take a slot, waiting in line for one if needed."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.acquire_nowait()
        except trio.WouldBlock:
            # The slot is counted for us by whoever unparks us (_dispatch).
            await self._lot.park()
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()

    def release(self) -> None:
        """Give a slot back (to the first waiter, if the capacity allows)."""
        if self._in_use <= 0:
            raise RuntimeError("release() without a slot held")
        self._in_use -= 1
        self._dispatch()

    def resize(self, capacity: int) -> None:
        """Set the capacity. Growing serves waiters now; shrinking only stops
        handing slots out until holders have released enough of them."""
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._capacity = capacity
        self._dispatch()

    def _dispatch(self) -> None:
        while self._in_use < self._capacity and len(self._lot):
            self._in_use += 1
            self._lot.unpark(count=1)
