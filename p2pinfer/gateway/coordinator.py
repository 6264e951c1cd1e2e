"""Quota tickets over RPC: each gateway coordinates some users and asks the
coordinator of the others (see :mod:`.quota` for the mechanism and its
overshoot bound).

RPC methods (member-only, served by every gateway):

    quota.acquire {user_id, key_id, limits, ticket?}  -> {ticket, coordinator}
    quota.release {ticket, tokens}           -> {released: bool}

The calling gateway names each ticket (``ticket``, 24 hex digits; the
coordinator prefixes the caller's peer id, so no gateway can name another's).
An acquire asked again after its connection broke gets the same ticket,
counted once; one the gateway gave up waiting for (a slow coordinator) is
released by name at once instead of holding a concurrency slot until it
expires, and if the release overtakes the acquire, the acquire is refused.
    quota.usage   {user_id}                  -> {requests, tokens, window_start, reset}
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from cachetools import LRUCache

from ..errors import CallError, InvalidParams, LimitError, NoWorkerAvailable, StreamBroken
from ..rpc.server import Access, CallContext, rpc_method
from .quota import Limits, QuotaBook, rendezvous_order

if TYPE_CHECKING:
    from ..context import RoleContext

__all__ = ["Lease", "QuotaService"]

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9:_.-]{1,64}$")
_NAME = re.compile(r"^[0-9a-f]{24}$")
COORDINATOR_COOLDOWN = 5.0
GATEWAYS_TTL = 1.0


@dataclass(frozen=True)
class Lease:
    """A ticket held for one request, and who issued it."""

    ticket: str
    coordinator: str


def _ticket_key(holder: str, name: str) -> str:
    """A ticket's id in the book: no gateway can name another's."""
    return f"{holder}/{name}"


def _id(params: dict[str, Any], key: str, *, optional: bool = False) -> str | None:
    value = params.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not _ID.match(value):
        raise InvalidParams(f"{key}: must be an id", data={"field": key})
    return value


class QuotaService:
    """The quota book of this gateway plus the client side of other books."""

    def __init__(self, node: RoleContext, *, timeout: float = 2.0) -> None:
        self.node = node
        self.timeout = timeout
        self.book = QuotaBook(seed=self._seed)
        self._down: dict[str, float] = {}
        self.failovers = 0
        self._nursery: trio.Nursery | None = None
        # (ledger stamp, good until, gateways); user id -> rendezvous order
        self._gateways: tuple[tuple[Any, int], float, list[str]] | None = None
        self._ranked: LRUCache[str, list[str]] = LRUCache(10_000)

    # -- who coordinates whom ------------------------------------------------------
    def _seed(self, user_id: str, window: int) -> tuple[int, int]:
        requests, tokens = self.node.ledger.usage_in_hour(window * 3600, user_id=user_id)
        return (int(requests), int(tokens))

    def gateways(self) -> list[str]:
        """Peer ids of the network's gateway members (this node included).

        Worked out again when the ledger applies a membership change, and at
        least every :data:`GATEWAYS_TTL` seconds (certificates expire)."""
        ledger = self.node.ledger
        stamp = (ledger.store, ledger.store.credentials_version)
        now = time.monotonic()
        if self._gateways is not None and self._gateways[0] == stamp \
                and now < self._gateways[1]:
            return self._gateways[2]
        peers: set[str] = {self.node.peer_id}
        wall = time.time()
        for member in ledger.members():
            if "gateway" in member.roles and member.active(wall):
                peers.add(member.peer_id)
        found = sorted(peers)
        if self._gateways is None or self._gateways[2] != found:
            self._ranked.clear()
        self._gateways = (stamp, now + GATEWAYS_TTL, found)
        return found

    def order(self, user_id: str) -> list[str]:
        """Coordinators for ``user_id``, best first; ones that recently failed last."""
        gateways = self.gateways()
        ranked = self._ranked.get(user_id)
        if ranked is None:
            ranked = self._ranked[user_id] = rendezvous_order(user_id, gateways)
        now = trio.current_time()
        if self._down and max(self._down.values()) <= now:
            self._down.clear()  # every cooldown is over
        if not self._down:
            return ranked
        up = [p for p in ranked if self._down.get(p, 0.0) <= now]
        return up + [p for p in ranked if p not in up]

    def on_peer_disconnected(self, peer_id: str) -> None:
        released = self.book.release_holder(peer_id)
        if released:
            log.info("released %d quota tickets held by %s (disconnected)", released, peer_id)

    # -- client side ---------------------------------------------------------------
    async def acquire(self, user_id: str, key_id: str, limits: Limits) -> Lease:
        """A ticket from the user's coordinator, failing over if it is unreachable.

        Raises:
            LimitError: the request must not run (with ``retry_after``).
            NoWorkerAvailable: no coordinator could be reached.
        """
        last: Exception | None = None
        for peer in self.order(user_id):
            if peer == self.node.peer_id:
                ticket = self.book.acquire(user_id, key_id, limits, holder=self.node.peer_id)
                return Lease(ticket.id, peer)
            name = secrets.token_hex(12)
            params = {"user_id": user_id, "key_id": key_id, "limits": limits.to_wire(),
                      "ticket": name}
            try:
                with trio.fail_after(self.timeout):
                    try:
                        out = await self.node.rpc.call(peer, "quota.acquire", params)
                    except StreamBroken:
                        # The connection under the call closed: most often the
                        # older of two, closed because the peer dialled again.
                        # Asked once more, on the connection kept, before
                        # another coordinator (whose counters lag) is asked.
                        out = await self.node.rpc.call(peer, "quota.acquire", params)
                return Lease(str(out["ticket"]), peer)
            except LimitError:
                raise
            except (CallError, trio.TooSlowError) as exc:
                log.warning("quota coordinator %s unreachable (%s); failing over", peer, exc)
                self._down[peer] = trio.current_time() + COORDINATOR_COOLDOWN
                self.failovers += 1
                last = exc
                # it may have granted the ticket all the same: return it
                self._release_later(Lease(_ticket_key(self.node.peer_id, name), peer))
        raise NoWorkerAvailable("no quota coordinator reachable",
                                data={"retry_after": 2.0}) from last

    def _release_later(self, lease: Lease) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self.release, lease, 0)

    async def release(self, lease: Lease, tokens: int) -> None:
        """Return a ticket (never raises: an unreturned ticket expires)."""
        if lease.coordinator == self.node.peer_id:
            self.book.release(lease.ticket, tokens)
            return
        try:
            with trio.fail_after(self.timeout):
                await self.node.rpc.call(lease.coordinator, "quota.release",
                                         {"ticket": lease.ticket, "tokens": tokens})
        except (CallError, trio.TooSlowError, InvalidParams) as exc:
            log.warning("could not return quota ticket to %s: %s", lease.coordinator, exc)

    async def usage(self, user_id: str) -> dict[str, Any]:
        for peer in self.order(user_id):
            if peer == self.node.peer_id:
                return self.book.usage(user_id)
            try:
                with trio.fail_after(self.timeout):
                    out = await self.node.rpc.call(peer, "quota.usage", {"user_id": user_id})
                return dict(out)
            except (CallError, trio.TooSlowError) as exc:
                self._down[peer] = trio.current_time() + COORDINATOR_COOLDOWN
                log.info("quota coordinator %s unreachable for usage: %s", peer, exc)
        return self.book.usage(user_id)

    # -- server side ---------------------------------------------------------------
    @rpc_method("quota.acquire", access=Access.MEMBER, grants=("gateway",))
    async def rpc_acquire(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        if not isinstance(params, dict):
            raise InvalidParams("params: must be a map")
        user_id = _id(params, "user_id")
        key_id = _id(params, "key_id")
        assert user_id is not None and key_id is not None
        limits = Limits.from_wire(params.get("limits"))
        name = params.get("ticket")
        if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
            raise InvalidParams("ticket: must be 24 hex digits", data={"field": "ticket"})
        ticket = self.book.acquire(user_id, key_id, limits, holder=ctx.peer_id,
                                   ticket_id=None if name is None
                                   else _ticket_key(ctx.peer_id, name))
        return {"ticket": ticket.id, "coordinator": self.node.peer_id}

    @rpc_method("quota.release", access=Access.MEMBER, grants=("gateway",))
    async def rpc_release(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        if not isinstance(params, dict):
            raise InvalidParams("params: must be a map")
        ticket = params.get("ticket")
        tokens = params.get("tokens", 0)
        if not isinstance(ticket, str) or len(ticket) > 128:
            raise InvalidParams("ticket: must be a ticket id", data={"field": "ticket"})
        if type(tokens) is not int or not 0 <= tokens <= 10**9:
            raise InvalidParams("tokens: must be a non-negative integer",
                                data={"field": "tokens"})
        return {"released": self.book.release(ticket, tokens, holder=ctx.peer_id)}

    @rpc_method("quota.usage", access=Access.MEMBER, grants=("gateway",))
    async def rpc_usage(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        if not isinstance(params, dict):
            raise InvalidParams("params: must be a map")
        user_id = _id(params, "user_id")
        assert user_id is not None
        return self.book.usage(user_id)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Expire abandoned tickets; return the ones given up on."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(5)
                self.book.expire(time.time())
