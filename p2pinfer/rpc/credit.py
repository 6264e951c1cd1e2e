"""A stream call's reader side, without I/O: the buffer of chunks that
arrived and the credit rule, shared by the trio client
(:mod:`~p2pinfer.rpc.client`) and the asyncio one (:mod:`~p2pinfer.rpc.aio`).

Each client subclasses :class:`ChunkBuffer` with the way its event loop
wakes the waiting reader, and asks :class:`CreditRule` after every chunk
taken how much credit to send the server.
"""

from __future__ import annotations

from collections import deque
from typing import Any

__all__ = ["ChunkBuffer", "CreditRule"]


class ChunkBuffer:
    """The chunks of one stream call, from the connection's reader to the
    caller: ``("chunk", value)``, then ``("end", trailer)`` or
    ``("error", exception)``. Subclasses define :meth:`_wake`."""

    __slots__ = ("items", "limit", "done")

    def __init__(self, window: int) -> None:
        # A server that keeps to our credit sends at most `window` chunks
        # ahead, plus END or ERROR: more is a protocol violation.
        self.items: deque[tuple[str, Any]] = deque()
        self.limit = window + 2
        self.done = False

    def _wake(self) -> None:
        """Wake the reader waiting for an item, if one is."""
        raise NotImplementedError

    def push(self, kind: str, value: Any) -> bool:
        """Queue an item; False (nothing queued) if the server overran its credit."""
        if len(self.items) >= self.limit:
            return False
        self.items.append((kind, value))
        self._wake()
        return True

    def fail(self, error: BaseException) -> None:
        """End the stream with ``error`` (once; later failures are ignored)."""
        if not self.done:
            self.done = True
            if len(self.items) >= self.limit:
                self.items.clear()  # chunks nobody will read: make room
            self.items.append(("error", error))
            self._wake()


class CreditRule:
    """How much credit a reader sends: per half window, or at once when the
    server has used all it had (it is waiting for us). A slow but steady
    reader then keeps the stream going; only one that stops reading runs
    into the server's stall timeout."""

    __slots__ = ("window", "consumed", "taken", "granted")

    def __init__(self, window: int) -> None:
        self.window = window
        self.consumed = 0       # chunks taken since the last credit sent
        self.taken = 0          # chunks taken in all
        self.granted = window   # chunks the server may send in all

    def took_chunk(self, queued: int) -> int:
        """One chunk taken, ``queued`` more still buffered: the credit to
        send now (0: none yet)."""
        self.consumed += 1
        self.taken += 1
        if (self.taken + queued >= self.granted
                or self.consumed >= max(1, self.window // 2)):
            credit, self.consumed = self.consumed, 0
            self.granted += credit
            return credit
        return 0
