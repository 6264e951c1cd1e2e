"""Collecting every node's metrics over RPC into one :class:`SwarmSnapshot`.

Which nodes: every member node found through discovery (``role/<name>`` for
each role, refreshed every ``discover_interval`` seconds) or connected to
this node, and every node seen before. A node keeps its place in the
snapshot while it is down (``up = false``, which is what the ``NodeDown``
alert watches) until it has been down ``forget_after`` seconds, or as soon
as it stops being a network member. Only members whose certificate grants a
node role are nodes: operator keys and role-less members (an operator's
command, an observer) come and go without ever counting as down.

How: one ``getNodeMetrics`` call per node per round, all at once; a round
waits ``peer_timeout`` for each, and a node that has not answered by then,
fails, or answers with malformed data counts as down for that round. A round
therefore never takes much longer than ``peer_timeout``, however many nodes
are dead. While :meth:`ClusterCollector.run` runs, a call that is still
going when its round ends carries on in the background (up to
``CALL_TIMEOUT``) and the next rounds wait on it instead of starting another:
a dead node gets at most one dial at a time, and a node that restarted is
reached even when reconnecting takes longer than ``peer_timeout`` (py-libp2p
needs about ten seconds to give up on a connection the peer closed).
Concurrent callers share one round (:meth:`ClusterCollector.snapshot`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from ..errors import P2PInferError
from . import catalogue as cat
from .alerts import Alert, AlertRule
from .samples import Family, NodeSample, Sample, SwarmSnapshot, decode_families, encode_families
from .settings import MetricsSettings

if TYPE_CHECKING:
    from ..context import RoleContext
    from .node_metrics import NodeMetrics

__all__ = ["ClusterCollector", "swarm_families"]

log = logging.getLogger(__name__)

DISCOVERED_ROLES = ("auth", "gateway", "inference", "metrics", "web")
CALL_TIMEOUT = 30.0


class _Call:
    """One ``getNodeMetrics`` call to a peer, possibly outliving the round
    that started it."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.sample: NodeSample | None = None


@dataclass
class _Peer:
    first_seen: float
    last_up: float | None = None
    inflight: _Call | None = None


class ClusterCollector:
    """Collects the swarm's metrics for a node with the metrics role.

    Args:
        node: the node.
        node_metrics: the node's own metrics (its sample, without RPC).
        settings: ``[metrics]`` settings (timeouts, intervals).
    """

    def __init__(self, node: RoleContext, node_metrics: NodeMetrics,
                 settings: MetricsSettings) -> None:
        self.node = node
        self.node_metrics = node_metrics
        self.settings = settings
        self.known: dict[str, _Peer] = {}
        self.last: SwarmSnapshot | None = None
        self.listeners: list[Callable[[SwarmSnapshot], None]] = []
        self.rounds = 0
        self._lock = trio.Lock()
        self._last_started = -math.inf
        self._nursery: trio.Nursery | None = None
        self._models_seen: dict[str, float] = {}

    # -- peers -------------------------------------------------------------------
    def add_peer(self, peer_id: str) -> None:
        """Start watching a member node (ignored for self, non-members, and
        members that are not nodes: operator keys and role-less observers,
        which connect for a command and leave)."""
        if peer_id == self.node.peer_id or peer_id in self.known:
            return
        if not self._is_node(peer_id):
            return
        self.known[peer_id] = _Peer(first_seen=trio.current_time())

    def _is_node(self, peer_id: str) -> bool:
        return bool(self.node.is_node(peer_id))

    async def discover(self) -> None:
        """Find member nodes of every role through the DHT."""
        found: set[str] = set()

        async def lookup(role: str) -> None:
            try:
                for desc in await self.node.discovery.find_role(role):
                    found.add(desc.peer_id)
            except P2PInferError as exc:
                log.debug("looking up role %s failed: %s", role, exc)

        async with trio.open_nursery() as nursery:
            for role in DISCOVERED_ROLES:
                nursery.start_soon(lookup, role)
        for peer_id in sorted(found):
            self.add_peer(peer_id)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Look for nodes every ``discover_interval`` seconds, and host the
        calls that outlive their round, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    await self.discover()
                    await trio.sleep(self.settings.discover_interval)
            finally:
                self._nursery = None

    def _prune(self, now: float) -> None:
        for peer_id in list(self.known):
            peer = self.known[peer_id]
            since = peer.last_up if peer.last_up is not None else peer.first_seen
            if not self._is_node(peer_id) or now - since > self.settings.forget_after:
                log.info("no longer watching node %s", peer_id)
                del self.known[peer_id]

    # -- collection -----------------------------------------------------------------
    async def snapshot(self, max_age: float = 0.0) -> SwarmSnapshot:
        """The latest snapshot if it is at most ``max_age`` seconds old, else a
        round that starts after this call (shared with any caller already
        waiting for one). ``max_age=0`` always gives fresh figures."""
        asked = trio.current_time()
        if self._fresh(asked, max_age):
            assert self.last is not None
            return self.last
        async with self._lock:
            if self._fresh(asked, max_age) or self._last_started >= asked:
                assert self.last is not None
                return self.last
            self._last_started = trio.current_time()
            snap = await self._collect()
            self.last = snap
            self.rounds += 1
            for listener in self.listeners:
                listener(snap)
            return snap

    def _fresh(self, now: float, max_age: float) -> bool:
        return self.last is not None and max_age > 0 and now - self.last.at <= max_age

    def local_sample(self) -> NodeSample:
        """This node's own metrics, without RPC."""
        started = trio.current_time()
        return NodeSample(self.node.peer_id, True,
                          families=decode_families(encode_families(self.node.registry)),
                          health=self.node_metrics.health(), seconds=trio.current_time() - started)

    async def _ask(self, peer_id: str, out: dict[str, NodeSample]) -> None:
        started = trio.current_time()
        timeout = self.settings.peer_timeout
        peer = self.known.get(peer_id)
        call = peer.inflight if peer is not None else None
        if call is None or call.done.is_set():
            call = _Call()
            if peer is not None:
                peer.inflight = call
            if self._nursery is not None:
                self._nursery.start_soon(self._call, peer_id, call, CALL_TIMEOUT)
                with trio.move_on_after(timeout):
                    await call.done.wait()
            else:  # not running (collection on demand only): bound the call itself
                await self._call(peer_id, call, timeout)
        else:
            with trio.move_on_after(timeout):
                await call.done.wait()
        sample = call.sample if call.done.is_set() else None
        if sample is None:
            sample = NodeSample(peer_id, False, error=f"no answer within {timeout:g}s")
        out[peer_id] = NodeSample(sample.peer_id, sample.up, sample.families, sample.health,
                                  sample.error, trio.current_time() - started)

    async def _call(self, peer_id: str, call: _Call, limit: float) -> None:
        sample = NodeSample(peer_id, False, error=f"no answer within {limit:g}s")
        try:
            with trio.move_on_after(limit):
                raw = await self.node.rpc.call(peer_id, "getNodeMetrics")
                if not isinstance(raw, dict):
                    raise ValueError("getNodeMetrics answered with a non-map")
                health = raw.get("health")
                sample = NodeSample(peer_id, True, families=decode_families(raw.get("families")),
                                    health=health if isinstance(health, dict) else {})
        except P2PInferError as exc:
            sample = NodeSample(peer_id, False, error=f"{type(exc).__name__}: {exc.message}")
        except ValueError as exc:
            sample = NodeSample(peer_id, False, error=f"malformed metrics: {exc}")
        except Exception as exc:
            # One peer must never take the collecting node down: count it as
            # down, and keep the traceback for whoever fixes the cause.
            log.warning("collecting from %s failed", peer_id, exc_info=True)
            sample = NodeSample(peer_id, False, error=f"{type(exc).__name__}: {exc}")
        finally:
            call.sample = sample
            call.done.set()

    async def _collect(self) -> SwarmSnapshot:
        for peer_id in self.node.connected_peers():
            self.add_peer(peer_id)
        now = trio.current_time()
        self._prune(now)
        samples: dict[str, NodeSample] = {self.node.peer_id: self.local_sample()}
        async with trio.open_nursery() as nursery:
            for peer_id in list(self.known):
                nursery.start_soon(self._ask, peer_id, samples)
        done = trio.current_time()
        for peer_id, sample in samples.items():
            peer = self.known.get(peer_id)
            if peer is not None and sample.up:
                peer.last_up = done
            elif peer is not None:
                log.debug("node %s is down: %s", peer_id, sample.error)
        return SwarmSnapshot(at=done, wall=time.time(), collector=self.node.peer_id,
                             nodes=samples, models=self._count_models(samples, done))

    def _count_models(self, samples: dict[str, NodeSample], now: float) -> dict[str, int]:
        counts: dict[str, int] = {m: 0 for m in self.settings.expected_models}
        for sample in samples.values():
            if not sample.up:
                continue
            for model in sample.health.get("models", []) or []:
                if not isinstance(model, dict):
                    continue
                name = cat.clean_label(model.get("name"))
                if name == "_invalid":
                    continue
                self._models_seen[name] = now
                counts.setdefault(name, 0)
                if model.get("status") == "loaded":
                    counts[name] += 1
        for name, seen in list(self._models_seen.items()):
            if now - seen > self.settings.forget_after:
                del self._models_seen[name]
            else:
                counts.setdefault(name, 0)
        return counts


def swarm_families(snapshot: SwarmSnapshot, firing: list[Alert],
                   rules: list[AlertRule]) -> list[Family]:
    """The swarm-level series a metrics node adds to the swarm view."""
    up = Family(cat.NODE_UP.removesuffix("_total"), "gauge",
                "1 if the node answered the last collection, else 0",
                [Sample(cat.NODE_UP, {"node": n.peer_id}, 1.0 if n.up else 0.0)
                 for n in snapshot.nodes.values()])
    took = Family("ai_platform_node_collect_seconds", "gauge",
                  "How long collecting the node's metrics took",
                  [Sample("ai_platform_node_collect_seconds", {"node": n.peer_id}, n.seconds)
                   for n in snapshot.nodes.values()])
    workers = Family(cat.MODEL_WORKERS, "gauge", "Nodes where the model is loaded",
                     [Sample(cat.MODEL_WORKERS, {"model": m}, float(c))
                      for m, c in sorted(snapshot.models.items())])
    counts: dict[tuple[str, str], int] = {(r.name, r.severity): 0 for r in rules}
    for alert in firing:
        counts[(alert.name, alert.severity)] = counts.get((alert.name, alert.severity), 0) + 1
    alerts = Family(cat.ALERTS_FIRING, "gauge", "Alert instances firing now (built-in rules)",
                    [Sample(cat.ALERTS_FIRING, {"alertname": n, "severity": s}, float(c))
                     for (n, s), c in sorted(counts.items())])
    return [up, took, workers, alerts]
