"""Anti-entropy: members compare version vectors and pull what they lack.

Correctness never depends on gossip. On every new connection, periodically
(``[ledger] sync_interval``, to a few random connected members), and
whenever gossip shows a gap, a node runs a *round* with a peer:

1. ``ledgerHello`` (public, once per connection): both sides hand over
   their own owner-signed certificates, so two members that never met learn
   that the other is a member before any member-only call;
2. ``ledgerSync`` (members only): exchange version vectors (highest
   contiguous seq per author) and membership digests; a differing digest
   brings the whole document set back;
3. ``ledgerPull`` (members only, server stream): the events of each author
   after our head, in batches, applied as they arrive.

A peer that learns from ``ledgerSync`` that the caller has events it lacks
starts its own round back at once, so a node that returns after a day is
both brought up to date and has its own writes collected promptly.

RPC parameters and results:

- ``ledgerHello {net, docs: [signed doc]}`` → ``{net, docs, member: bool}``
- ``ledgerSync {vv: {author: seq}, digest: bytes}`` → ``{vv, digest, docs?,
  own_max, own_log_max?, ckpt?, floor?}`` (``own_max``: the caller's
  highest event held here, and ``own_log_max`` its highest log-lane event,
  for a node restored from a backup, see :mod:`.backup`; ``ckpt``:
  the header of the newest checkpoint held here and ``floor`` the version
  vector up to which events were pruned, see :mod:`.checkpoints`)
- ``ledgerPull {after: {author: seq}, limit: int}`` → stream of
  ``[raw event, ...]`` batches, in ascending seq per author
  (``CheckpointRequired`` if ``after`` is below ``floor`` for an author).

A node behind a peer's ``floor``, or at least ``[ledger]
checkpoint_catchup`` events behind its checkpoint, fetches the checkpoint
(``ledgerCheckpoint``) before pulling the rest.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import trio

from ..errors import (
    CheckpointRequired,
    InvalidParams,
    LedgerError,
    NotMember,
    P2PInferError,
    PeerUnavailable,
    StorageError,
    UnknownMethod,
    WrongNetwork,
)
from ..rpc import Access, CallContext, rpc_method
from .checkpoints import CheckpointHeader
from .membership import short

if TYPE_CHECKING:  # pragma: no cover
    from .ledger import Ledger

__all__ = ["LedgerService", "AntiEntropy"]

log = logging.getLogger(__name__)

MAX_VV_ENTRIES = 100_000
MAX_HELLO_DOCS = 64
PULL_BATCH_BYTES = 1024 * 1024
CALL_TIMEOUT = 10.0
MAX_CONCURRENT_ROUNDS = 4
HINT_DELAY = 0.25
HINT_COOLDOWN = 1.0


def _vv(value: Any, name: str) -> dict[str, int]:
    if not isinstance(value, dict) or len(value) > MAX_VV_ENTRIES:
        raise InvalidParams(f"{name} must be a map of author -> seq")
    for author, seq in value.items():
        if not isinstance(author, str) or type(seq) is not int or seq < 0:
            raise InvalidParams(f"{name} must map peer ids to non-negative integers")
    return value


def pull_params(params: Any) -> tuple[dict[str, int], int]:
    """``after`` and ``limit`` of a pull (``ledgerPull``, ``ledgerLogPull``)."""
    p = param_map(params)
    after = _vv(p.get("after"), "after")
    limit = p.get("limit", 10_000)
    if type(limit) is not int or not 0 < limit <= 1_000_000:
        raise InvalidParams("limit must be an integer between 1 and 1000000")
    return after, limit


def serve_pull(after: Mapping[str, int], limit: int, batch_size: int,
               head: Callable[[str], int],
               read: Callable[[str, int, int], list[tuple[int, bytes]]],
               ) -> Iterator[list[bytes]]:
    """The chunks a pull answers: each author's events after ``after`` in
    ascending seq, ``batch_size`` read at a time, at most ``limit`` in all.
    ``head(author)`` is the highest seq held, ``read(author, after, n)``
    gives (seq, raw) pairs (a lane whose old events expired has holes)."""
    sent = 0
    for author in sorted(after):
        cursor = after[author]
        while sent < limit and cursor < head(author):
            held = read(author, cursor, min(batch_size, limit - sent))
            if not held:
                break
            yield from chunks_of(raw for _seq, raw in held)
            cursor = held[-1][0]
            sent += len(held)


async def pulled(rpc: Any, peer: str, method: str, after: Mapping[str, int],
                 limit: int) -> AsyncGenerator[list[bytes], None]:
    """The chunks of raw events a pull from ``peer`` brings, each within
    :data:`CALL_TIMEOUT` of the last (InvalidParams for a malformed one).
    Use it in ``contextlib.aclosing`` so the call ends when the reader stops."""
    async with rpc.stream(peer, method, {"after": dict(after), "limit": limit}) as chunks:
        while True:
            with trio.fail_after(CALL_TIMEOUT):
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
            if not isinstance(chunk, list) or not all(isinstance(r, bytes) for r in chunk):
                raise InvalidParams(f"malformed {method} chunk")
            yield chunk


def chunks_of(raws: Iterable[bytes]) -> Iterator[list[bytes]]:
    """Raw events in chunks of at most :data:`PULL_BATCH_BYTES` (a single
    larger event alone)."""
    chunk: list[bytes] = []
    size = 0
    for raw in raws:
        if chunk and size + len(raw) > PULL_BATCH_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(raw)
        size += len(raw)
    if chunk:
        yield chunk


def param_map(params: Any) -> dict[str, Any]:
    """RPC params that must be a map (InvalidParams otherwise)."""
    if not isinstance(params, dict):
        raise InvalidParams("expected a map")
    return params


class LedgerService:
    """The ledger's RPC handlers (registered on the node's RPC server)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    @rpc_method("ledgerHello", access=Access.PUBLIC)
    async def rpc_hello(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """Exchange own certificates (public: the caller may not be known yet)."""
        p = param_map(params)
        if p.get("net") != self.ledger.network_id:
            raise WrongNetwork(f"this node belongs to network {self.ledger.network_id}")
        docs = p.get("docs", [])
        if not isinstance(docs, list) or len(docs) > MAX_HELLO_DOCS:
            raise InvalidParams(f"docs must be a list of at most {MAX_HELLO_DOCS} documents")
        self.ledger.store.absorb_docs(docs, source=f"hello from {short(ctx.peer_id)}")
        return {
            "net": self.ledger.network_id,
            "docs": [d.to_wire() for d in self.ledger.own_docs()],
            "member": self.ledger.is_member(ctx.peer_id),
        }

    @rpc_method("ledgerSync", access=Access.MEMBER)
    async def rpc_sync(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """Version vectors and membership digests."""
        p = param_map(params)
        theirs = _vv(p.get("vv"), "vv")
        store = self.ledger.store
        mine = store.version_vector()
        digest = store.membership.digest()
        # The caller's own highest event here, held ones included: a node
        # restored from a backup learns from it where its sequence stands.
        out: dict[str, Any] = {"vv": mine, "digest": digest,
                               "own_max": store.max_seq_of(ctx.peer_id)}
        own_log = store.log_heads.get(ctx.peer_id, 0)
        if own_log:  # the same for its request logs (see .logs)
            out["own_log_max"] = own_log
        newest = store.newest_checkpoint()
        if newest is not None:
            out["ckpt"] = newest.to_wire()
        if store.floor:
            out["floor"] = store.floor
        if p.get("digest") != digest:
            out["docs"] = [d.to_wire() for d in store.membership.docs()]
        ahead = {a: s for a, s in theirs.items() if s > mine.get(a, 0)}
        if ahead:
            self.ledger.hint_sync(ctx.peer_id, ahead)
        return out

    @rpc_method("ledgerPull", access=Access.MEMBER)
    async def rpc_pull(self, ctx: CallContext, params: Any) -> AsyncIterator[list[bytes]]:
        """Stream the caller's missing events, author by author."""
        after, limit = pull_params(params)
        store = self.ledger.store
        below = {a: s for a, s in store.floor.items() if after.get(a, s) < s}
        if below:
            raise CheckpointRequired(
                "events asked for were pruned here: take this node's checkpoint first",
                data={"floor": below})

        def read(author: str, cursor: int, n: int) -> list[tuple[int, bytes]]:
            # the main lane has no holes: the events after ``cursor`` in order
            return list(enumerate(store.read_range(author, cursor, n), cursor + 1))

        for chunk in serve_pull(after, limit, self.ledger.settings.batch_size,
                                lambda a: store.heads.get(a, 0), read):
            yield chunk


class AntiEntropy:
    """Runs sync rounds with peers: on request, and periodically.

    Args:
        ledger: the local ledger.
        rpc: an :class:`~p2pinfer.rpc.RpcClient`.
        peers: returns the currently connected peer ids.
    """

    def __init__(self, ledger: Ledger, rpc: Any, peers: Callable[[], list[str]]) -> None:
        self.ledger = ledger
        self.rpc = rpc
        self.peers = peers
        self.settings = ledger.settings
        self._due: dict[str, float] = {}
        # why a round is due: None = unconditionally, else the events wanted
        self._wants: dict[str, dict[str, int] | None] = {}
        self._last_start: dict[str, float] = {}
        self._running: set[str] = set()
        self._greeted: set[str] = set()
        self._strangers: set[str] = set()
        self._candidates: set[str] = set()
        self._wake = trio.Event()
        self.rounds = 0

    def request(self, peer_id: str) -> None:
        """Sync with ``peer_id`` as soon as possible (non-blocking)."""
        self._wants[peer_id] = None
        self._schedule(peer_id, trio.current_time())

    def hint(self, peer_id: str, want: Mapping[str, int]) -> None:
        """``peer_id`` has events up to ``want`` that we lack (a gossip gap,
        or it told us it is ahead). Events in flight on gossip usually arrive
        within milliseconds, so the round waits :data:`HINT_DELAY` and is
        dropped if by then we have them; it also runs at most once per
        :data:`HINT_COOLDOWN` per peer, so busy writers set off no storm."""
        if peer_id not in self._wants or self._wants[peer_id] is not None:
            wanted = self._wants.setdefault(peer_id, {})
            assert wanted is not None
            for author, seq in want.items():
                wanted[author] = max(wanted.get(author, 0), seq)
        start = self._last_start.get(peer_id, -HINT_COOLDOWN)
        now = trio.current_time()
        self._schedule(peer_id, max(now + HINT_DELAY, start + HINT_COOLDOWN))

    def _schedule(self, peer_id: str, due: float) -> None:
        self._due[peer_id] = min(due, self._due.get(peer_id, due))
        self._wake.set()

    def _still_needed(self, peer_id: str) -> bool:
        """False for a hinted round whose events have arrived meanwhile."""
        want = self._wants.pop(peer_id, None)
        return want is None or not self.ledger.covers(want)

    def connected(self, peer_id: str) -> None:
        """A new connection to a peer worth greeting: greet, then sync. Until
        a greeting succeeds the peer is retried with the periodic rounds."""
        self._greeted.discard(peer_id)
        self._strangers.discard(peer_id)
        self._candidates.add(peer_id)
        self.request(peer_id)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            next_periodic = trio.current_time() + self.settings.sync_interval
            while True:
                now = trio.current_time()
                if now >= next_periodic:
                    for peer in self._periodic_targets():
                        self._wants[peer] = None
                        self._due[peer] = now
                    next_periodic = now + self.settings.sync_interval
                wake_at = next_periodic
                for peer, due in sorted(self._due.items(), key=lambda kv: kv[1]):
                    if due > now:
                        wake_at = min(wake_at, due)
                    elif peer not in self._running and len(self._running) < MAX_CONCURRENT_ROUNDS:
                        del self._due[peer]
                        if not self._still_needed(peer):
                            continue
                        self._running.add(peer)
                        self._last_start[peer] = now
                        nursery.start_soon(self._round, peer)
                with trio.move_on_at(wake_at):
                    await self._wake.wait()
                self._wake = trio.Event()

    def _periodic_targets(self) -> list[str]:
        connected = set(self.peers())
        self._candidates &= connected
        members = [p for p in connected
                   if p not in self._strangers and self.ledger.is_member(p)]
        random.shuffle(members)
        return members[: self.settings.sync_fanout] + sorted(self._candidates)

    async def _round(self, peer: str) -> None:
        outcome = "error"
        try:
            outcome = await self._sync_with(peer)
        except NotMember:
            self._greeted.discard(peer)
            outcome = "not_member"
        except (WrongNetwork, UnknownMethod, PeerUnavailable) as exc:
            if peer not in self._greeted:  # not a member node of this network: leave it be
                self._strangers.add(peer)
                self._candidates.discard(peer)
                outcome = "stranger"
            log.debug("sync with %s failed: %s", short(peer), exc)
        except (P2PInferError, trio.TooSlowError) as exc:
            if isinstance(exc, StorageError):
                log.error("ledger store failed during sync with %s: %s", short(peer), exc)
            else:
                log.debug("sync with %s failed: %s", short(peer), exc)
        finally:
            self._running.discard(peer)
            self.rounds += 1
            self.ledger.metrics.syncs.labels(outcome).inc()
            self._wake.set()

    async def _sync_with(self, peer: str) -> str:
        ledger = self.ledger
        store = ledger.store
        if peer not in self._greeted:
            with trio.fail_after(CALL_TIMEOUT):
                reply = await self.rpc.call(peer, "ledgerHello", {
                    "net": ledger.network_id,
                    "docs": [d.to_wire() for d in ledger.own_docs()],
                })
            if not isinstance(reply, dict) or reply.get("net") != ledger.network_id:
                self._strangers.add(peer)
                self._candidates.discard(peer)
                return "stranger"
            docs = reply.get("docs")
            if isinstance(docs, list):
                store.absorb_docs(docs[:MAX_HELLO_DOCS], source=f"hello to {short(peer)}")
            self._greeted.add(peer)
            self._candidates.discard(peer)
        if not ledger.is_member(peer):
            self._strangers.add(peer)
            return "stranger"
        with trio.fail_after(CALL_TIMEOUT):
            reply = await self.rpc.call(peer, "ledgerSync", {
                "vv": store.version_vector(), "digest": store.membership.digest()})
        if not isinstance(reply, dict):
            raise InvalidParams("malformed ledgerSync reply")
        docs = reply.get("docs")
        if isinstance(docs, list):
            store.absorb_docs(docs, source=f"sync with {short(peer)}")
        theirs = _vv(reply.get("vv"), "vv")
        own_max, own_log = reply.get("own_max"), reply.get("own_log_max")
        ledger.heard_version(peer, theirs, own_max if type(own_max) is int else None,
                             own_log if type(own_log) is int and own_log < 2**53 else None)
        floor = _vv(reply.get("floor", {}), "floor")
        if "ckpt" in reply:
            header = CheckpointHeader.from_wire(reply["ckpt"])
            if ledger.checkpoints.wants(header, floor):
                try:
                    await ledger.checkpoints.fetch(peer, header)
                except StorageError:
                    raise
                except LedgerError as exc:  # a bad checkpoint: pull what we can
                    log.warning("refused the checkpoint of %s offered by %s: %s",
                                short(header.maker), short(peer), exc.message)
        mine = store.version_vector()
        # What the peer pruned and we lack must come from a checkpoint.
        want = {a: mine.get(a, 0) for a, s in theirs.items()
                if s > mine.get(a, 0) and mine.get(a, 0) >= floor.get(a, 0)}
        behind = sum(theirs[a] - mine.get(a, 0) for a in want)
        ledger.metrics.behind.set(behind)
        if not want:
            return "in_sync"
        limit = self.settings.pull_limit
        received = 0
        async with aclosing(pulled(self.rpc, peer, "ledgerPull", want, limit)) as chunks:
            async for chunk in chunks:
                received += len(chunk)
                ledger.ingest(chunk, source="sync", origin=peer)
                await trio.lowlevel.checkpoint()
        if received >= limit:
            self.request(peer)  # more to fetch
        return "pulled"
