"""A resizable pool of generation slots, shared fairly between users.

:class:`SlotPool` is a counting semaphore whose capacity can change while
requests hold and wait for slots, which is what lets a worker grow and
shrink a model's slots at run time (``[scaling] autoscale``):

- **growing** hands the new slots to waiting requests at once;
- **shrinking** never takes a slot away from a request that holds one: the
  pool just stops handing slots out until enough holders have released
  theirs (``in_use`` may stay above ``capacity`` for a while, never the
  other way round).

**Fair share.** Each request names its *share* (the gateway sends an opaque
hash of the user; requests without one share their gateway's). A freed slot
goes to the waiting request whose share holds the fewest slots at that
moment, the earliest among equals; with one share this is strictly first
come, first served. So a user who sends eight requests at a two-slot worker
does not make another user's single request wait for all eight: it gets
the next slot that frees. When the queue is full, a newcomer may take the
place of the newest waiter of the share that holds and waits for the most
(:meth:`SlotPool.make_room`), which then fails with :class:`Displaced`.

**A slot kept for the others.** A share that already holds a slot does not
take the last free one while another share that used the pool in the last
``reserve`` seconds (30) holds none: with two slots and two users, each
always finds one, even while the other's requests are stuck (a reader that
stopped, until the stall timeout ends it). A user alone uses every slot; the
price is one slot left idle for a while after another user's last request.
Never more than ``capacity - 1`` slots are kept, and none with one slot.

A slot freed while others wait is handed over directly, so a newcomer cannot
jump the queue, and a waiter cancelled before it got a slot leaves no trace.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import trio

__all__ = ["Displaced", "RESERVE", "SlotPool", "SlotPoolStatistics"]

# Seconds a share that used the pool keeps a claim on a slot (see above).
RESERVE = 30.0
# Shares remembered before the quiet ones are forgotten on a take, so that
# a pool one user at a time passes through does not grow without bound.
SEEN_MAX = 256


class Displaced(Exception):
    """A waiting request gave its place in the queue to a lighter share's."""


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


@dataclass(eq=False)
class _Waiter:
    share: str
    seq: int
    event: trio.Event = field(default_factory=trio.Event)
    outcome: str | None = None  # "granted" or "displaced" once decided


class SlotPool:
    """A fair semaphore with a capacity that may change (see the module docstring).

    Args:
        capacity: slots at first (>= 1).
    """

    def __init__(self, capacity: int, *, reserve: float = RESERVE) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._capacity = capacity
        self._in_use = 0
        self.reserve = reserve
        self._held: Counter[str] = Counter()
        self._seen: dict[str, float] = {}  # share -> when it last took or gave a slot
        self._waiters: list[_Waiter] = []  # in arrival order
        self._seq = itertools.count()

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
        return SlotPoolStatistics(self._capacity, self._in_use, len(self._waiters))

    def held_by(self, share: str) -> int:
        """Slots that requests of ``share`` hold now."""
        return self._held[share]

    def acquire_nowait(self, share: str = "") -> None:
        """Take a slot if one is free and nobody waits for one.

        Raises:
            trio.WouldBlock: no free slot (or others are first in line).
        """
        if self._in_use >= self._capacity or self._waiters or self._kept_from(share):
            raise trio.WouldBlock
        self._take(share)

    async def acquire(self, share: str = "") -> None:
        """Take a slot, waiting in line for one if needed.

        Raises:
            Displaced: a newcomer of a lighter share took this place in line.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.acquire_nowait(share)
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        waiter = _Waiter(share, next(self._seq))
        self._waiters.append(waiter)
        # a slot kept from the others may be this share's to take now
        self._dispatch()
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.outcome == "granted":  # the slot came with the cancellation
                self.release(share)
            elif waiter.outcome is None:
                self._waiters.remove(waiter)
            raise
        if waiter.outcome == "displaced":
            raise Displaced("another user's request took this place in the queue")

    def release(self, share: str = "") -> None:
        """Give a slot back (to the fairest waiter, if the capacity allows)."""
        if self._in_use <= 0:
            raise RuntimeError("release() without a slot held")
        self._in_use -= 1
        self._seen[share] = trio.current_time()
        left = self._held[share] - 1
        if left > 0:
            self._held[share] = left
        else:
            del self._held[share]
        self._dispatch()

    def resize(self, capacity: int) -> None:
        """Set the capacity. Growing serves waiters now; shrinking only stops
        handing slots out until holders have released enough of them."""
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._capacity = capacity
        self._dispatch()

    def make_room(self, share: str) -> bool:
        """Displace the newest waiter of the heaviest share (slots held plus
        requests waiting) if that evens out the shares: True when a place
        was freed for a request of ``share``, False when ``share`` is itself
        among the heaviest and should be refused instead."""
        if not self._waiters:
            return False
        load = self._held.copy()
        load.update(w.share for w in self._waiters)
        mine = load[share] + 1  # counting the newcomer
        heaviest = max((w.share for w in self._waiters), key=lambda s: load[s])
        if load[heaviest] - 1 < mine:
            return False
        victim = next(w for w in reversed(self._waiters) if w.share == heaviest)
        self._waiters.remove(victim)
        victim.outcome = "displaced"
        victim.event.set()
        return True

    def _take(self, share: str) -> None:
        self._in_use += 1
        self._held[share] += 1
        self._seen[share] = trio.current_time()
        if len(self._seen) > SEEN_MAX:
            self._forget_quiet(trio.current_time())

    def _forget_quiet(self, now: float) -> None:
        """Forget shares that have not used the pool for ``reserve`` seconds."""
        for old in [s for s, t in self._seen.items() if now - t > self.reserve]:
            del self._seen[old]

    def _kept_from(self, share: str) -> bool:
        """Whether the free slots are kept for other recent shares that hold
        none (see the module docstring), so that ``share`` must wait."""
        if self._capacity < 2 or self._held[share] == 0:
            return False
        self._forget_quiet(trio.current_time())
        others = sum(1 for s in self._seen if s != share and self._held[s] == 0)
        return self._capacity - self._in_use <= min(others, self._capacity - 1)

    def _dispatch(self) -> None:
        while self._in_use < self._capacity and self._waiters:
            held = self._held
            waiter = min(self._waiters, key=lambda w: (held[w.share], w.seq))
            if self._kept_from(waiter.share):
                break  # every waiter's share holds a slot: the rest are kept
            self._waiters.remove(waiter)
            self._take(waiter.share)
            waiter.outcome = "granted"
            waiter.event.set()
