"""One connection per peer, chosen the same way on both sides, and never one
that answers are streaming on.

Two connections to one peer happen for two reasons, and they call for
opposite remedies:

- **The peer gave up on the first one** (its address changed, or it
  restarted faster than TCP noticed) and dialled again. Calls would keep
  going down the dead one until the dead-link timeout, so it must go now.
- **Both sides dialled at once**, or nearly: a restarted hub redials its
  workers while they redial it, and a dial that tries one address after
  another can land seconds after the peer's. Both connections are alive and
  answers may already be streaming on either: closing one cuts them.

Who dialled a connection is the one fact both ends see alike, so the rules
rest on it. A node dials a peer only when it holds no connection to it
(py-libp2p reuses a live one), so of two connections **the same side
dialled**, the older is one its dialler lost: it is closed at once, by both
ends. Of two connections **dialled from opposite sides**, the older is first
asked to prove it is alive (a stream opened on that very connection must be
answered within :data:`PROBE_TIMEOUT`); if it cannot, it is closed. If it
can, both are alive: both ends keep the one dialled by the smaller peer id
and *retire* the other. A retired connection gets no new stream (see
:func:`steer_streams`), each end moves its RPC channel to the kept one, and
the retired one is closed once no RPC stream is left on it (at most
:data:`RETIRE_MAX` seconds later), so no answer in flight is cut. If the kept
one dies first, the retired one is simply used again.

A client (a peer with no node role) uses its newest connection: the others
are closed at once.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import trio

from .host import RPC_PROTOCOL

__all__ = ["ConnectionKeeper", "PROBE_TIMEOUT", "RETIRE_MAX", "steer_streams"]

log = logging.getLogger(__name__)

# Seconds the older of two cross-dialled connections has to answer a probe.
# A live one answers in milliseconds; a busy node (one that just restarted
# and replays its ledger) well within this.
PROBE_TIMEOUT = 3.0
# Seconds a retired connection may keep carrying answers (the gateway's
# longest request is 300 s by default).
RETIRE_MAX = 600.0
RETIRE_POLL = 0.5

_RETIRED = "_p2pinfer_retired"
_pinned: contextvars.ContextVar[Any] = contextvars.ContextVar("p2pinfer_pinned_conn",
                                                              default=None)


def steer_streams(host: Any) -> None:
    """Make the host open new streams on the connection this module says.

    py-libp2p picks among a peer's connections the one with the most
    streams. Here a retired connection is passed over whenever the peer has
    another, and a probe (:func:`_pinned`) opens its stream on exactly the
    connection it tests.
    """
    swarm = host.get_network()
    original = swarm._select_connection

    def select(connections: list[Any], peer_id: Any) -> Any:
        probe = _pinned.get()
        if probe is not None and probe.active:  # (tasks spawned meanwhile see it inactive)
            if any(c is probe.conn for c in connections):
                return probe.conn
            raise ConnectionError("the connection to probe is gone")
        usable = [c for c in connections if not getattr(c, _RETIRED, False)]
        return original(usable or connections, peer_id)

    swarm._select_connection = select


@dataclass(eq=False)
class _Probe:
    conn: Any
    active: bool = True


@contextmanager
def _pin(conn: Any) -> Iterator[None]:
    """Open this task's next stream on ``conn``: only while the probe runs,
    even in tasks py-libp2p spawns meanwhile (they inherit the context)."""
    probe = _Probe(conn)
    token = _pinned.set(probe)
    try:
        yield
    finally:
        probe.active = False
        _pinned.reset(token)


def dialled_here(conn: Any) -> bool:
    """Whether this side dialled ``conn`` (a py-libp2p swarm connection)."""
    return bool(getattr(conn.muxed_conn, "is_initiator", False))


def born(conn: Any) -> float:
    return float(getattr(conn, "_created_at", 0.0) or 0.0)


def _streams(conn: Any) -> list[Any]:
    try:
        return list(conn.get_streams())
    except Exception:  # a connection closing under us
        return []


def rpc_streams(conn: Any) -> int:
    """RPC streams open on ``conn`` (either side's channel)."""
    count = 0
    for stream in _streams(conn):
        try:
            if stream.get_protocol() == RPC_PROTOCOL:
                count += 1
        except Exception:
            continue
    return count


class ConnectionKeeper:
    """Applies the module's rules each time a peer gains a connection.

    Args:
        host: the py-libp2p host (:func:`steer_streams` installed on it).
        peer_id: this node's peer id.
        is_node: whether a peer is a member node (else a client).
        moved: called with a peer id when this side should reopen its RPC
            channel to it (the channel is on a connection being closed or
            retired; calls in flight on it still finish).
    """

    def __init__(self, host: Any, peer_id: str, *, is_node: Callable[[str], bool],
                 moved: Callable[[str], None]) -> None:
        self.host = host
        self.peer_id = peer_id
        self.is_node = is_node
        self.moved = moved
        self._locks: dict[str, trio.Lock] = {}

    def connections(self, peer_id: str) -> list[Any]:
        swarm = self.host.get_network()
        return [c for pid, cs in getattr(swarm, "connections", {}).items()
                if pid.to_base58() == peer_id for c in cs if not c.is_closed]

    async def settle(self, peer_id: str, nursery: trio.Nursery) -> None:
        """Apply the rules to ``peer_id``'s connections (called on each new one)."""
        lock = self._locks.setdefault(peer_id, trio.Lock())
        try:
            async with lock:
                await self._settle(peer_id, nursery)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(peer_id, None)

    async def _settle(self, peer_id: str, nursery: trio.Nursery) -> None:
        conns = self.connections(peer_id)
        if len(conns) < 2:
            return
        if not self.is_node(peer_id):
            newest = max(conns, key=born)
            await self._close(peer_id, [c for c in conns if c is not newest], "older")
            return
        ours = sorted((c for c in conns if dialled_here(c)), key=born)
        theirs = sorted((c for c in conns if not dialled_here(c)), key=born)
        await self._close(peer_id, ours[:-1] + theirs[:-1], "redialled past")
        if not (ours and theirs):
            return
        mine, peers = ours[-1], theirs[-1]
        older = min((mine, peers), key=born)
        if not await self._answers(peer_id, older):
            await self._close(peer_id, [older], "silent")
            return
        keep, retire = (mine, peers) if self.peer_id < peer_id else (peers, mine)
        if getattr(retire, _RETIRED, False) or retire.is_closed:
            return
        setattr(retire, _RETIRED, True)
        log.info("two live connections to %s: keeping the one %s dialled, retiring the "
                 "other once its %d RPC stream(s) end", peer_id,
                 "we" if keep is mine else "it", rpc_streams(retire))
        self.moved(peer_id)
        nursery.start_soon(self._drain, peer_id, keep, retire)

    async def _answers(self, peer_id: str, conn: Any) -> bool:
        """Whether ``conn`` carries a round trip within :data:`PROBE_TIMEOUT`."""
        from libp2p.peer.id import ID

        with trio.move_on_after(PROBE_TIMEOUT):
            try:
                with _pin(conn):
                    stream = await self.host.new_stream(ID.from_base58(peer_id),
                                                        [RPC_PROTOCOL])
            except Exception as exc:
                log.debug("probe of a connection to %s failed: %r", peer_id, exc)
                return False
            try:
                await stream.close()
            except Exception:
                pass
            return True
        log.debug("probe of a connection to %s: no answer in %.0fs", peer_id, PROBE_TIMEOUT)
        return False

    async def _drain(self, peer_id: str, keep: Any, retire: Any) -> None:
        deadline = trio.current_time() + RETIRE_MAX
        while not retire.is_closed:
            if keep.is_closed:  # the kept one died first: use this one again
                setattr(retire, _RETIRED, False)
                return
            if rpc_streams(retire) == 0 or trio.current_time() >= deadline:
                await self._close(peer_id, [retire], "retired")
                return
            await trio.sleep(RETIRE_POLL)

    async def _close(self, peer_id: str, conns: list[Any], why: str) -> None:
        if not conns:
            return
        for conn in conns:
            log.debug("closing a second connection to %s (%s)", peer_id, why)
            with trio.move_on_after(2):
                try:
                    await conn.close()
                except Exception:
                    log.debug("closing a duplicate connection failed", exc_info=True)
        self.moved(peer_id)  # its next call opens a stream on the one kept
