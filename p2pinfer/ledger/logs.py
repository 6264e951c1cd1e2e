"""The log lane: request logs stay where they are used.

Every member replicates what any node may need to serve a request: users,
keys, sessions, membership and the usage totals that limits and quotas add
up (the *main lane*, :mod:`.replication`). Request logs are one row per
request and are read by few (the dashboard, data exports, operators), so
they are not replicated everywhere. A ``log.requests`` event (the same
signed format as every event, numbered in its author's own log sequence)
is held by:

- its **author**, the gateway that served the requests;
- the author's **keepers**: ``[ledger] log_replicas`` members (2 by
  default) chosen by rendezvous hashing of the author's peer id among the
  members whose certificates grant ``auth`` or ``metrics`` (the nodes that
  read logs), the author excluded. Each node computes the same keepers from
  its membership view; when a keeper leaves, the next one in the ranking
  takes its place and pulls the whole retained history.

Keepers pull (``ledgerLogPull``) every ``[ledger] sync_interval``: from the
author when connected, else from another keeper of that author. Only a
member whose certificate grants ``auth`` or ``metrics`` may pull, and events
of the log lane are never gossiped, so an inference-only worker never
receives a request log. A log written less than a pull interval before its
gateway is lost exists only there until the gateway returns (its store
keeps it).

Readers (:meth:`LogLane.gather`, for the dashboard, ``usage`` and data
exports) take this node's rows and ask every connected member that may hold
logs (gateways, auth and metrics nodes) with ``ledgerLogs``, merging rows by
id: a user's requests through any number of gateways show together.

RPC parameters and results:

- ``ledgerLogPull {after: {author: seq}, limit}`` (grants auth or metrics)
  → stream of ``[raw event, ...]`` batches, ascending seq per author;
- ``ledgerLogs {user_id, limit}`` (grants auth, metrics, web, gateway or
  operator)
  → stream of ``[[id, user_id, api_key_id, prompt_hash, model_used,
  response_time_ms, tokens_used, status, created_at, gateway], ...]``
  batches, newest first.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import trio

from ..errors import InvalidParams, P2PInferError, StorageError
from ..grants import LOG_KEEPERS, LOG_READERS
from ..rpc import Access, CallContext, rpc_method
from . import queries
from .membership import short
from .replication import param_map, pull_params, pulled, serve_pull

if TYPE_CHECKING:  # pragma: no cover
    from .ledger import Ledger

__all__ = ["LogLane", "LogService", "KEEPER_GRANTS", "rendezvous"]

log = logging.getLogger(__name__)

#: Grants that make a member a possible keeper of others' logs.
KEEPER_GRANTS = LOG_KEEPERS
#: Grants of members that may hold logs: keepers and authors.
HOLDER_GRANTS = KEEPER_GRANTS | {"gateway"}
GATHER_TIMEOUT = 3.0
MAX_PULL_SOURCES = 4  # pulls run at once
ROW_BATCH = 1000
MAX_GATHER_ROWS = 1_000_000  # as many as a data export lists (privacy.MAX_ROWS)


def rendezvous(author: str, candidates: Sequence[str], k: int) -> list[str]:
    """The ``k`` candidates ranked highest for ``author`` (highest random
    weight hashing): every node ranks the same, and removing one candidate
    changes no other's rank."""
    def weight(peer: str) -> bytes:
        return hashlib.sha256(f"{author}\x00{peer}".encode()).digest()

    return sorted(candidates, key=weight, reverse=True)[:k]


def _row(r: queries.RequestLog) -> list[Any]:
    return [r.id, r.user_id, r.api_key_id, r.prompt_hash, r.model_used, r.response_time_ms,
            r.tokens_used, r.status, r.created_at, r.gateway]


def _from_wire(item: Any) -> queries.RequestLog:
    if not isinstance(item, list) or len(item) != 10:
        raise InvalidParams("a request log row is an array of 10 fields")
    rid, user, key, digest, model, ms, tokens, status, at, gateway = item
    if not (isinstance(rid, str) and isinstance(digest, str) and isinstance(model, str)
            and isinstance(status, str) and isinstance(gateway, str)
            and (user is None or isinstance(user, str)) and (key is None or isinstance(key, str))
            and isinstance(ms, int | float) and type(tokens) is int
            and isinstance(at, int | float)):
        raise InvalidParams("malformed request log row")
    return queries.RequestLog(rid, user, key, digest, model, float(ms), tokens, status,
                              float(at), gateway)


class LogService:
    """RPC handlers of the log lane (registered with the ledger's)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    @rpc_method("ledgerLogPull", access=Access.MEMBER, grants=tuple(sorted(KEEPER_GRANTS)))
    async def rpc_log_pull(self, ctx: CallContext, params: Any) -> AsyncIterator[list[bytes]]:
        """Stream the log-lane events the caller lacks, author by author."""
        after, limit = pull_params(params)
        store = self.ledger.store
        for chunk in serve_pull(after, limit, self.ledger.settings.batch_size,
                                lambda a: store.log_heads.get(a, 0), store.read_log_range):
            yield chunk

    @rpc_method("ledgerLogs", access=Access.MEMBER, grants=tuple(sorted(LOG_READERS)))
    async def rpc_logs(self, ctx: CallContext, params: Any) -> AsyncIterator[list[list[Any]]]:
        """A user's request log rows held here, newest first, in batches."""
        p = param_map(params)
        user_id = p.get("user_id")
        if not isinstance(user_id, str) or not 0 < len(user_id) <= 64:
            raise InvalidParams("user_id must be a user id")
        limit = p.get("limit", 100)
        if type(limit) is not int or not 0 < limit <= MAX_GATHER_ROWS:
            raise InvalidParams(f"limit must be an integer between 1 and {MAX_GATHER_ROWS}")
        rows = self.ledger.request_logs(user_id=user_id, limit=limit)
        for i in range(0, len(rows), ROW_BATCH):
            yield [_row(r) for r in rows[i:i + ROW_BATCH]]
            await trio.lowlevel.checkpoint()


class LogLane:
    """Keeps this node's share of others' request logs, and reads a user's
    logs across the swarm.

    Args:
        ledger: the local ledger.
        rpc: an :class:`~p2pinfer.rpc.RpcClient` (None: local only).
        peers: returns the currently connected peer ids.
    """

    def __init__(self, ledger: Ledger, rpc: Any, peers: Callable[[], list[str]]) -> None:
        self.ledger = ledger
        self.rpc = rpc
        self.peers = peers
        self.pulled = 0  # events taken from peers
        self.rounds = 0

    # -- who keeps what --------------------------------------------------------------
    def _active(self, grants: frozenset[str]) -> list[str]:
        membership = self.ledger.store.membership
        now = time.time()
        return [m.peer_id for m in membership.members()
                if m.removed_after is None and m.active(now)
                and membership.grants(m.peer_id, now) & grants]

    def keepers_for(self, author: str) -> list[str]:
        """The members that keep ``author``'s request logs (besides it)."""
        candidates = [p for p in self._active(KEEPER_GRANTS) if p != author]
        return rendezvous(author, candidates, self.ledger.settings.log_replicas)

    def kept_authors(self) -> list[str]:
        """The authors whose logs this node keeps for them."""
        me = self.ledger.peer_id
        return [a for a in self._active(frozenset({"gateway"}))
                if a != me and me in self.keepers_for(a)]

    # -- pulling ----------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.ledger.settings.sync_interval)
            await self.pull_round()

    async def pull_round(self) -> int:
        """Pull what this node lacks of the logs it keeps; returns events taken."""
        if self.rpc is None:
            return 0
        connected = set(self.peers())
        me = self.ledger.peer_id
        heads = self.ledger.store.log_heads
        plan: dict[str, dict[str, int]] = {}
        for author in self.kept_authors():
            for source in [author, *self.keepers_for(author)]:
                if source != me and source in connected:
                    plan.setdefault(source, {})[author] = heads.get(author, 0)
                    break
        taken = 0
        limiter = trio.CapacityLimiter(MAX_PULL_SOURCES)

        async def pull(source: str, after: dict[str, int]) -> None:
            # Nothing escapes: a failed pull (the peer, or this node's full
            # disk) is retried by the next round, and the node keeps serving.
            nonlocal taken
            async with limiter:
                try:
                    taken += await self._pull(source, after)
                except StorageError as exc:
                    log.error("could not store request logs pulled from %s: %s",
                              short(source), exc)
                except (P2PInferError, trio.TooSlowError) as exc:
                    log.debug("log pull from %s failed: %s", short(source), exc)

        async with trio.open_nursery() as nursery:
            for source, after in plan.items():
                nursery.start_soon(pull, source, after)
        self.rounds += 1
        return taken

    async def _pull(self, source: str, after: dict[str, int]) -> int:
        limit = self.ledger.settings.pull_limit
        received = 0
        async with aclosing(pulled(self.rpc, source, "ledgerLogPull", after, limit)) as chunks:
            async for chunk in chunks:
                report = self.ledger.store.ingest_logs(chunk,
                                                       source=f"logs from {short(source)}")
                received += len(report.applied)
                await trio.lowlevel.checkpoint()
        self.pulled += received
        return received

    # -- reading ----------------------------------------------------------------------
    async def gather(self, user_id: str, limit: int) -> list[queries.RequestLog]:
        """``user_id``'s newest ``limit`` request log rows from this node and
        every connected member that may hold some, merged by row id."""
        limit = max(1, min(limit, MAX_GATHER_ROWS))
        rows = {r.id: r for r in self.ledger.request_logs(user_id=user_id, limit=limit)}
        me = self.ledger.peer_id
        connected = set(self.peers()) if self.rpc is not None else set()
        holders = [p for p in self._active(HOLDER_GRANTS) if p != me and p in connected]

        async def ask(peer: str) -> None:
            got: list[queries.RequestLog] = []
            try:
                with trio.fail_after(GATHER_TIMEOUT):
                    async with self.rpc.stream(peer, "ledgerLogs",
                                               {"user_id": user_id, "limit": limit}) as chunks:
                        async for chunk in chunks:
                            if not isinstance(chunk, list):
                                raise InvalidParams("malformed ledgerLogs chunk")
                            got.extend(_from_wire(item) for item in chunk)
            except (P2PInferError, trio.TooSlowError) as exc:
                log.debug("could not read request logs from %s: %s", short(peer), exc)
                return
            for r in got:
                if r.user_id == user_id:
                    rows.setdefault(r.id, r)

        async with trio.open_nursery() as nursery:
            for peer in holders:
                nursery.start_soon(ask, peer)
        out = sorted(rows.values(), key=lambda r: (-r.created_at, r.id))
        return out[:limit]
