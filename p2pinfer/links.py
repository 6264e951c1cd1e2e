"""The links a node keeps to other members, for its whole life.

A node dials, and redials whenever the link is lost, two kinds of targets:

- its **bootstrap peers** (``[node] bootstrap``, else the join token's
  addresses), always;
- the **member nodes it has seen** (members whose certificate grants a node
  role; operator keys come and go): each one it is connected to is asked for
  its signed descriptor, whose addresses go into the node's own store
  (``peer_addrs``, never replicated). At start the node dials the
  ``[node] keep_links`` members seen most recently (16 by default) before
  any peer answers, so no node is special: a restarted hub redials its
  workers as they redial it, and a worker whose bootstrap node moved still
  reaches the others.

Each target has one task: dial its addresses in turn; when all fail, wait
with backoff (0.2 s doubling to 5 s, +-25 % jitter) and try again, for ever;
once linked, wait until the last connection to it closes, then start over
(the backoff restarts only after a link that held 10 s, so a peer that
closes every connection at once is not dialled five times a second). After
each (re)link the node refreshes its DHT routing table and announces its
topics again, so a restarted peer, which lost its routing table and
provider records, knows it at once. A member removed by the owner is
dropped at once; clients never become targets (they are not members).

The node's own addresses are watched too (every ``ADDRESS_WATCH`` seconds):
when they change (a new IP address on a laptop or a VM), the node announces
the new ones and closes the connections that left from an address it no
longer has, so that they are redialled from the new one at once instead of
waiting for TCP to give up on them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from .errors import P2PInferError

if TYPE_CHECKING:  # pragma: no cover
    from .ledger.store import Store
    from .node import Node

__all__ = ["Links", "RETRY_FIRST", "RETRY_MAX", "JITTER", "STABLE", "ADDRESS_WATCH"]

log = logging.getLogger(__name__)

RETRY_FIRST = 0.2
RETRY_MAX = 5.0
JITTER = 0.25
STABLE = 10.0
ADDRESS_WATCH = 2.0
YIELD = 2.0  # seconds the larger peer id of two member nodes waits before dialling
# A member's stored addresses are rewritten when they change, else at most
# this often (to keep "last seen" current without a write per connection).
SEEN_REFRESH = 3600.0


@dataclass
class _Target:
    peer_id: str
    addrs: list[str]
    bootstrap: bool
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    linked: bool = False


class Links:
    """Keeps this node linked to its bootstrap peers and known members.

    Args:
        node: the node (its host, RPC, discovery, store and membership).
        keep: members besides the bootstrap peers to stay linked to.
        clock: wall-clock seconds (stored "last seen" times).
    """

    def __init__(self, node: Node, *, keep: int, clock: Callable[[], float]) -> None:
        self.node = node
        self.keep = keep
        self.clock = clock
        self.targets: dict[str, _Target] = {}
        self._lost: dict[str, trio.Event] = {}
        self._stored: dict[str, tuple[tuple[str, ...], float]] = {}
        self._nursery: trio.Nursery | None = None
        self._own: list[str] = []

    # -- what to stay linked to ---------------------------------------------------
    def _store(self) -> Store:
        return self.node.ledger.store

    async def run(self, bootstrap: Sequence[str], *,
                  task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for addr in bootstrap:
                peer_id = addr.rsplit("/p2p/", 1)[-1]
                target = self.targets.get(peer_id)
                if target is None:
                    self._start(_Target(peer_id, [addr], bootstrap=True))
                elif addr not in target.addrs:
                    target.addrs.append(addr)
            for peer_id, addrs, seen in self._store().known_addrs():
                self._stored[peer_id] = (tuple(addrs), seen)
                if peer_id in self.targets:
                    self.targets[peer_id].addrs.extend(
                        a for a in addrs if a not in self.targets[peer_id].addrs)
                elif self._wanted(peer_id) and self._room():
                    self._start(_Target(peer_id, list(addrs), bootstrap=False))
            self._own = list(self.node.addrs)
            nursery.start_soon(self._watch_addresses)
            task_status.started()
            await trio.sleep_forever()

    def _wanted(self, peer_id: str) -> bool:
        return peer_id != self.node.peer_id and self.node.is_node(peer_id) \
            and not self.node.removed_peer(peer_id)

    def _room(self) -> bool:
        return sum(1 for t in self.targets.values() if not t.bootstrap) < self.keep

    def _start(self, target: _Target) -> None:
        assert self._nursery is not None
        self.targets[target.peer_id] = target
        self._nursery.start_soon(self._keep, target)

    def learned(self, peer_id: str, addrs: Sequence[str]) -> None:
        """Member ``peer_id`` announced ``addrs`` (its verified descriptor)."""
        addrs = [a for a in addrs if a.endswith("/p2p/" + peer_id)]
        if not addrs or not self._wanted(peer_id):
            return
        now = self.clock()
        stored = self._stored.get(peer_id)
        if stored is None or stored[0] != tuple(addrs) or now - stored[1] > SEEN_REFRESH:
            try:
                self._store().remember_addrs(peer_id, list(addrs), now)
            except P2PInferError:
                log.warning("could not store the addresses of %s", peer_id, exc_info=True)
            self._stored[peer_id] = (tuple(addrs), now)
        target = self.targets.get(peer_id)
        if target is not None:
            # the announced addresses first, then whatever else was known
            target.addrs[:] = list(addrs) + [a for a in target.addrs if a not in addrs]
        elif self._nursery is not None and self._room():
            self._start(_Target(peer_id, list(addrs), bootstrap=False))

    def removed(self, peer_id: str) -> None:
        """The owner removed ``peer_id``: stop dialling it, forget where it was."""
        target = self.targets.pop(peer_id, None)
        if target is not None:
            target.scope.cancel()
        self._stored.pop(peer_id, None)
        try:
            self._store().forget_addrs(peer_id)
        except P2PInferError:
            log.warning("could not forget the addresses of %s", peer_id, exc_info=True)

    def disconnected(self, peer_id: str) -> None:
        """The last connection to ``peer_id`` closed."""
        lost = self._lost.pop(peer_id, None)
        if lost is not None:
            lost.set()

    def linked(self) -> list[str]:
        """Targets linked now."""
        return [p for p, t in self.targets.items() if t.linked]

    def unlinked_bootstrap(self) -> list[str]:
        """Bootstrap peers this node is not linked to now (redialling them)."""
        return [p for p, t in self.targets.items() if t.bootstrap and not t.linked
                and p not in self.node.connected_peers()]

    def problems(self) -> list[dict[str, str]]:
        """What the node's health reports about its links: each bootstrap
        peer it is not linked to (``{"kind": "unlinked", "text"}``)."""
        return [{"kind": "unlinked", "text": f"not linked to its bootstrap peer {peer_id}"}
                for peer_id in self.unlinked_bootstrap()]

    # -- one target ----------------------------------------------------------------
    async def _dial(self, target: _Target) -> bool:
        if target.peer_id in self.node.connected_peers():
            return True  # it dialled us
        for addr in list(target.addrs):
            try:
                with trio.fail_after(10):
                    await self.node.connect(addr)
                return True
            except (P2PInferError, trio.TooSlowError) as exc:
                log.debug("link to %s: %s failed: %s", target.peer_id[-8:], addr, exc)
        return False

    async def _yield_to(self, target: _Target, ever: bool) -> None:
        """Between two member nodes that both keep a link to each other, the
        one with the larger peer id waits ``YIELD`` seconds before dialling,
        so that the other's dial usually comes first: two connections
        opened at once make one side close one, failing the calls on it (an
        answer streaming over it is cut). This holds for a bootstrap peer
        too once linked: a restarted hub dials back the workers it stored
        while they dial it. A node's first dial of a bootstrap peer never
        waits: that peer does not know it yet."""
        if target.bootstrap and not ever:
            return
        if self.node.peer_id > target.peer_id:
            await trio.sleep(random.uniform(YIELD, 1.5 * YIELD))
        else:
            await trio.sleep(random.uniform(0, 0.2))

    async def _keep(self, target: _Target) -> None:
        delay = RETRY_FIRST
        ever = False
        said = False  # one line per outage at INFO; each redial at DEBUG
        with target.scope:
            while True:
                await self._yield_to(target, ever)
                if not await self._dial(target):
                    wait = delay * random.uniform(1 - JITTER, 1 + JITTER)
                    log.log(logging.INFO if target.bootstrap and not said else logging.DEBUG,
                            "%s %s not reachable; retrying in %.1fs (and on, with backoff)",
                            "bootstrap" if target.bootstrap else "member",
                            target.peer_id, wait)
                    said = True
                    await trio.sleep(wait)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                linked_at = trio.current_time()
                said = False
                lost = self._lost.setdefault(target.peer_id, trio.Event())
                target.linked = True
                await self.node.discovery.add_peer(target.peer_id)
                await self.node.discovery.refresh()
                self.node.discovery.request_announce()
                if target.bootstrap and not ever:
                    log.info("joined through bootstrap peer %s", target.peer_id)
                elif ever:
                    log.info("link to %s %s restored", "bootstrap peer" if target.bootstrap
                             else "member", target.peer_id)
                ever = True
                if target.peer_id in self.node.connected_peers():
                    await lost.wait()
                target.linked = False
                self._lost.pop(target.peer_id, None)
                if not self._wanted(target.peer_id) and not target.bootstrap:
                    self.targets.pop(target.peer_id, None)
                    return
                log.warning("link to %s %s lost; redialing", "bootstrap peer"
                            if target.bootstrap else "member", target.peer_id)
                if trio.current_time() - linked_at >= STABLE:
                    delay = RETRY_FIRST
                    await trio.sleep(RETRY_FIRST * random.uniform(0.5, 1.5))
                else:
                    await trio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)

    # -- our own addresses -----------------------------------------------------------
    async def _watch_addresses(self) -> None:
        while True:
            await trio.sleep(ADDRESS_WATCH)
            now = list(self.node.addrs)
            if now == self._own:
                continue
            log.info("this node's addresses changed: %s -> %s", ", ".join(self._own) or "none",
                     ", ".join(now) or "none")
            self._own = now
            self.node.invalidate_descriptor()
            await self._close_stranded()

    async def _close_stranded(self) -> None:
        """Close connections whose local address this machine no longer has."""
        from .addresses import interface_ips
        from .rpc.host import local_ip

        mine = set(interface_ips(4)) | set(interface_ips(6))
        swarm = self.node.host.get_network()
        for peer, conns in list(getattr(swarm, "connections", {}).items()):
            ips = {local_ip(conn) for conn in (conns if isinstance(conns, list) else [conns])}
            stranded = {ip for ip in ips if ip is not None and ip not in mine}
            if not stranded:
                continue
            log.info("closing the connection to %s from %s, an address this machine no "
                     "longer has", peer, ", ".join(sorted(stranded)))
            # through the swarm, so that the link is seen lost (and redialled)
            # now: closing the socket alone waits for a FIN that cannot leave
            with trio.move_on_after(2):
                try:
                    await self.node.host.disconnect(peer)
                except Exception:
                    log.debug("closing a stranded connection failed", exc_info=True)
            self.node.on_link_closed(peer.to_base58() if hasattr(peer, "to_base58")
                                     else str(peer))
