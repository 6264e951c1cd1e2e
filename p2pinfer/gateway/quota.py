"""Rate limits that hold across the whole swarm, not per gateway.

**The mechanism: one coordinator per user.** Every gateway maps a user id to
the same coordinating gateway by rendezvous hashing over the network's
gateway members (highest ``sha256(user_id | peer_id)`` wins, skipping
gateways that are currently unreachable). Before a request starts, the
gateway that received it asks the coordinator for a *ticket*
(``quota.acquire``); the coordinator checks, in one place and in memory:

- requests of the user in the current clock hour (the tier's limit:
  ``DEFAULT_RATE_LIMIT`` or ``PREMIUM_RATE_LIMIT``),
- requests of the API key in the current hour (``[gateway] key_rate_limit``),
- tokens of the user in the current hour (``[gateway] token_limit`` per tier),
- requests in flight for the API key (``[gateway] concurrent_per_key``) and
  for the user, all keys and sessions together (``concurrent_per_user``).

When the request ends, for any reason, the gateway returns the ticket with
the exact token count the backend reported (``quota.release``). A ticket that
is never returned (its gateway died) is released when the connection to
that gateway closes, and at the latest when it expires.

Windows are fixed clock hours (UTC); a denial carries ``retry_after`` (the
seconds until the window resets, or ~1 s for a concurrency slot) and the
limit, the scope (``user``/``key``) and the reset time.

**Worst-case overshoot.** With a stable set of gateways every admission is
decided by one process, so the limit is exact: never more than ``limit``
requests in a window. It can be exceeded only when the coordinator changes
within a window (it died, or gateways disagree about who is reachable):

- the new coordinator seeds its counters from the replicated request logs,
  which lag by the ledger's flush and convergence time (about 1-2 s): the
  requests the old coordinator admitted in that last interval are missing
  from the new counters, and that many more may be admitted;
- while two gateways disagree about the coordinator (one sees it down, one
  does not), each coordinator admits from its own counters: at most the
  requests admitted during the disagreement.

Tokens are known only after a request completes, so the token limit admits
a request while the user is under it; the overshoot is at most
``concurrent_per_key x max_tokens`` of the requests in flight at that moment.

Measured overshoot is in ``benchmarks/RESULTS.md`` (``limit_overshoot_ratio``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConcurrencyLimited, InvalidParams, QuotaExceeded, RateLimited

__all__ = [
    "Limits",
    "Ticket",
    "QuotaBook",
    "rendezvous_order",
    "WINDOW_SECONDS",
]

log = logging.getLogger(__name__)

WINDOW_SECONDS = 3600
DEFAULT_TICKET_TTL = 900.0
# unknown ticket ids remembered at most (see QuotaBook.release)
MAX_RELEASED_EARLY = 65_536
MAX_TRACKED_WINDOWS = 2


@dataclass(frozen=True)
class Limits:
    """What one user (and one of their keys) may do per window."""

    requests_per_window: int
    key_requests_per_window: int | None = None
    tokens_per_window: int | None = None
    concurrent_per_key: int | None = None
    concurrent_per_user: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "requests": self.requests_per_window,
            "key_requests": self.key_requests_per_window,
            "tokens": self.tokens_per_window,
            "concurrent": self.concurrent_per_key,
            "concurrent_user": self.concurrent_per_user,
        }

    @classmethod
    def from_wire(cls, data: Any) -> Limits:
        if not isinstance(data, dict):
            raise InvalidParams("limits: must be a map", data={"field": "limits"})

        def opt(key: str, *, required: bool = False) -> int | None:
            value = data.get(key)
            if value is None and not required:
                return None
            if type(value) is not int or not 0 <= value <= 10**12:
                raise InvalidParams(f"limits.{key}: must be a non-negative integer",
                                    data={"field": f"limits.{key}"})
            return value

        requests = opt("requests", required=True)
        assert requests is not None
        return cls(requests, opt("key_requests"), opt("tokens"), opt("concurrent"),
                   opt("concurrent_user"))


@dataclass
class Ticket:
    """Permission for one request, held until it ends."""

    id: str
    user_id: str
    key_id: str
    window: int
    holder: str
    expires: float


@dataclass
class _UserWindow:
    requests: int = 0
    tokens: int = 0


@dataclass
class QuotaBook:
    """The coordinator's counters (sans-IO: pass ``now`` in, nothing awaits).

    Args:
        seed: called the first time a user is seen in a window; returns the
            (requests, tokens) already recorded for that user in the window
            (from the replicated request logs) so a new coordinator does not
            start from zero.
    """

    seed: Callable[[str, int], tuple[int, int]] | None = None
    users: dict[tuple[str, int], _UserWindow] = field(default_factory=dict)
    keys: dict[tuple[str, int], int] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    user_in_flight: dict[str, int] = field(default_factory=dict)
    tickets: dict[str, Ticket] = field(default_factory=dict)
    # ids released before they were granted (a caller that gave up on its
    # acquire): until then, an acquire with such an id is not granted
    released_early: dict[str, float] = field(default_factory=dict)
    granted: int = 0
    denied: int = 0

    @staticmethod
    def window_of(now: float) -> int:
        return int(now // WINDOW_SECONDS)

    @staticmethod
    def reset_at(window: int) -> float:
        return float((window + 1) * WINDOW_SECONDS)

    def _user(self, user_id: str, window: int) -> _UserWindow:
        entry = self.users.get((user_id, window))
        if entry is None:
            entry = _UserWindow()
            if self.seed is not None:
                try:
                    entry.requests, entry.tokens = self.seed(user_id, window)
                except Exception:  # a seed failure must not block admissions
                    log.exception("seeding quota counters for %s failed", user_id)
            self.users[(user_id, window)] = entry
        return entry

    def acquire(
        self,
        user_id: str,
        key_id: str,
        limits: Limits,
        *,
        holder: str,
        now: float | None = None,
        ttl: float = DEFAULT_TICKET_TTL,
        ticket_id: str | None = None,
    ) -> Ticket:
        """Admit one request or raise the limit error that applies.

        ``ticket_id``: the id the caller chose, so that it can return a
        ticket it gave up waiting for. Asking again with the same id (a
        call repeated after its connection broke) returns the same ticket,
        counted once.

        Raises:
            InvalidParams: ``ticket_id`` was released already (its caller
                gave up on this acquire and is not listening).
            RateLimited: requests per window for the user or the key.
            QuotaExceeded: tokens per window for the user.
            ConcurrencyLimited: requests in flight for the key or the user.
        """
        now = time.time() if now is None else now
        if ticket_id is not None:
            held = self.tickets.get(ticket_id)
            if held is not None:
                return held
            if ticket_id in self.released_early:
                raise InvalidParams("ticket: released before it was granted",
                                    data={"field": "ticket"})
        window = self.window_of(now)
        reset = self.reset_at(window)
        retry = max(1.0, math.ceil(reset - now))
        user = self._user(user_id, window)
        if user.requests >= limits.requests_per_window:
            self.denied += 1
            raise RateLimited(
                f"rate limit reached: {limits.requests_per_window} requests per hour",
                data={"retry_after": retry, "limit": limits.requests_per_window,
                      "remaining": 0, "reset": reset, "scope": "user"},
            )
        key_count = self.keys.get((key_id, window), 0)
        if limits.key_requests_per_window is not None and \
                key_count >= limits.key_requests_per_window:
            self.denied += 1
            raise RateLimited(
                f"rate limit reached for this API key: {limits.key_requests_per_window} "
                "requests per hour",
                data={"retry_after": retry, "limit": limits.key_requests_per_window,
                      "remaining": 0, "reset": reset, "scope": "key"},
            )
        if limits.tokens_per_window is not None and user.tokens >= limits.tokens_per_window:
            self.denied += 1
            raise QuotaExceeded(
                f"token quota reached: {limits.tokens_per_window} tokens per hour",
                data={"retry_after": retry, "limit": limits.tokens_per_window,
                      "remaining": 0, "reset": reset, "scope": "user"},
            )
        active = self.in_flight.get(key_id, 0)
        if limits.concurrent_per_key is not None and active >= limits.concurrent_per_key:
            self.denied += 1
            raise ConcurrencyLimited(
                f"at most {limits.concurrent_per_key} requests in flight per API key",
                data={"retry_after": 1.0, "limit": limits.concurrent_per_key,
                      "scope": "key"},
            )
        user_active = self.user_in_flight.get(user_id, 0)
        if limits.concurrent_per_user is not None and \
                user_active >= limits.concurrent_per_user:
            self.denied += 1
            raise ConcurrencyLimited(
                f"at most {limits.concurrent_per_user} requests in flight per user",
                data={"retry_after": 1.0, "limit": limits.concurrent_per_user,
                      "scope": "user"},
            )
        user.requests += 1
        self.keys[(key_id, window)] = key_count + 1
        self.in_flight[key_id] = active + 1
        self.user_in_flight[user_id] = user_active + 1
        ticket = Ticket(ticket_id or secrets.token_hex(12), user_id, key_id, window, holder,
                        now + ttl)
        self.tickets[ticket.id] = ticket
        self.granted += 1
        self._forget_old_windows(window)
        return ticket

    def release(self, ticket_id: str, tokens: int = 0, *, holder: str | None = None,
                now: float | None = None) -> bool:
        """Return a ticket; ``tokens`` are added to the user's window. False
        if the ticket was unknown (already released or expired: an unknown
        id is remembered for :data:`DEFAULT_TICKET_TTL`, so that its acquire,
        if it arrives later, is not granted) or not ``holder``'s."""
        ticket = self.tickets.get(ticket_id)
        if ticket is None:
            if len(self.released_early) < MAX_RELEASED_EARLY:
                now = time.time() if now is None else now
                self.released_early[ticket_id] = now + DEFAULT_TICKET_TTL
            return False
        if holder is not None and ticket.holder != holder:
            return False
        del self.tickets[ticket_id]
        self._free_slot(self.in_flight, ticket.key_id)
        self._free_slot(self.user_in_flight, ticket.user_id)
        if tokens > 0:
            entry = self.users.get((ticket.user_id, ticket.window))
            if entry is not None:
                entry.tokens += tokens
        return True

    def release_holder(self, holder: str) -> int:
        """Release every ticket held by a gateway that went away."""
        gone = [t for t in self.tickets.values() if t.holder == holder]
        for ticket in gone:
            self.release(ticket.id)
        return len(gone)

    def expire(self, now: float) -> int:
        """Release tickets past their expiry (the coordinator calls this
        every few seconds: scanning on every acquire would cost O(tickets))."""
        stale = [t.id for t in self.tickets.values() if t.expires <= now]
        for ticket_id in stale:
            self.release(ticket_id)
        for ticket_id in [i for i, until in self.released_early.items() if until <= now]:
            del self.released_early[ticket_id]
        return len(stale)

    @staticmethod
    def _free_slot(counts: dict[str, int], key: str) -> None:
        left = counts.get(key, 0) - 1
        if left > 0:
            counts[key] = left
        else:
            counts.pop(key, None)

    def _forget_old_windows(self, window: int) -> None:
        if len(self.users) > 4096 or len(self.keys) > 4096:
            cutoff = window - MAX_TRACKED_WINDOWS + 1
            self.users = {k: v for k, v in self.users.items() if k[1] >= cutoff}
            self.keys = {k: v for k, v in self.keys.items() if k[1] >= cutoff}

    def usage(self, user_id: str, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        window = self.window_of(now)
        entry = self._user(user_id, window)
        return {"requests": entry.requests, "tokens": entry.tokens,
                "window_start": float(window * WINDOW_SECONDS), "reset": self.reset_at(window)}

    def held(self) -> int:
        """Tickets currently out (requests in flight swarm-wide for our users)."""
        return len(self.tickets)


def rendezvous_order(user_id: str, peers: list[str]) -> list[str]:
    """Gateways in the order they coordinate ``user_id`` (first = coordinator)."""

    def score(peer: str) -> bytes:
        return hashlib.sha256(f"{user_id}|{peer}".encode()).digest()

    return sorted(peers, key=score, reverse=True)
