"""GossipSub as a fast hint for new ledger events.

Each node publishes the events it writes on the topic
``/p2pinfer/<network id>/ledger/1``; a message is a msgpack array of raw
events (a burst is sent as a few batches, not one message per event).
Receivers hand the events to the store like any other; gossip is never
trusted to deliver everything: anti-entropy (:mod:`.replication`) repairs
what it loses.

py-libp2p 0.8.1 drops messages silently with its defaults (see the project's
libp2p notes), so:

- spam protection is off (it allows ~10 messages per second per topic);
- the heartbeat runs every second (default: 120 s);
- the subscription channel and the per-peer outbound queues are enlarged
  (:func:`tune_pubsub`; these are module globals of py-libp2p, so the change
  is process-wide and made once);
- one task reads the subscription continuously;
- **members only, both ways**: pubsub opens no stream to a peer that is not
  a network member, and refuses (resets) one a non-member opens, so a
  non-member never learns our subscriptions, cannot subscribe or graft, and
  is sent nothing: a topic validator filters only what comes *in*, and
  anyone subscribed would otherwise receive every event (users, emails,
  password and key hashes). A peer that opens a pubsub stream is given
  :data:`MEMBER_WAIT` seconds for its certificate to arrive (``ledgerHello``
  runs right after a connection opens); we open one to a peer only once it
  is a member (:meth:`Gossip.admit`, called when its certificate is
  applied), and a removed one is cut off (:meth:`Gossip.expel`);
- a topic validator drops messages whose origin is not a network member
  before they are forwarded;
- the pubsub stream handler is guarded: py-libp2p lets a malformed frame's
  DecodeError escape it, which would take the host down;
- the mesh is small (degree 3) and neither IP-diversity nor "opportunistic"
  grafting run, which otherwise put every peer in every mesh;
- the router keeps a digest, not the whole message, for its equivocation
  check, and trims its delivery-time list: py-libp2p 0.8.1 holds the last
  500-1,000 messages (up to 32 kB each, in protobuf's C heap) and one float
  per message for ever when adaptive gossip is off, which showed as a heap
  growing with every request (benchmarks/RELIABILITY.md).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from ..rpc.host import guard_handler
from ..wire import pack, unpack

__all__ = ["Gossip", "tune_pubsub", "topic_for"]

log = logging.getLogger(__name__)

QUEUE_SIZE = 100_000
MAX_BATCH_EVENTS = 256
# Small messages: py-libp2p 0.8.1 may write a replay of recent messages to a
# new peer's stream while its sender task writes the same stream; writes that
# span several Noise frames can then interleave and corrupt the stream.
MAX_BATCH_BYTES = 32 * 1024
# Events applied per step of the receiving event loop (see Gossip._reader):
# about one request.logged event of 50 rows (~15 KB, ~2.5 ms on a worker).
DELIVER_BYTES = 16 * 1024
# Seconds a newly connected peer has to become a member (its certificate
# arrives by ledgerHello within milliseconds) before pubsub gives up on it.
MEMBER_WAIT = 5.0
_tuned = False


def topic_for(network_id: str) -> str:
    return f"/p2pinfer/{network_id}/ledger/1"


def tune_pubsub() -> None:
    """Enlarge py-libp2p's pubsub buffers (process-wide, idempotent)."""
    global _tuned
    if _tuned:
        return
    import libp2p.pubsub.pubsub as ps
    import libp2p.pubsub.rpc_queue as rq

    ps.SUBSCRIPTION_CHANNEL_SIZE = QUEUE_SIZE  # type: ignore[attr-defined]

    class _BigRpcQueue(rq.RpcQueue):  # type: ignore[misc]
        def __init__(self, max_size: int = QUEUE_SIZE,
                     max_message_size: int = rq.DefaultMaxMessageSize) -> None:
            super().__init__(max_size, max_message_size)

    ps.RpcQueue = _BigRpcQueue  # type: ignore[attr-defined]
    _tuned = True


DELIVERY_WINDOW = 60.0  # seconds of publish times kept (py-libp2p reads the last minute)


def message_digest(msg: Any) -> bytes:
    """What the equivocation check compares: the data and the topics."""
    h = hashlib.blake2b(digest_size=16)
    h.update(msg.data)
    for topic in msg.topicIDs:
        h.update(b"\0" + topic.encode())
    return h.digest()


def _router_class(base: Any) -> Any:
    """GossipSub with three repairs to py-libp2p 0.8.1:

    - no "opportunistic grafting": it grafts two more peers per heartbeat
      whenever all scores are equal (always, without score parameters), so
      every mesh grows to every peer and each message is sent to everyone by
      everyone;
    - the equivocation check (same origin and sequence number, other content)
      remembers a 16-byte digest per message instead of the message itself:
      py-libp2p keeps up to 1,000 whole messages there;
    - the publish times kept for adaptive gossip are trimmed at each heartbeat
      even when adaptive gossip is off (py-libp2p trims them only when it is
      on, so the list grew by one float per message for ever).
    """

    class LedgerGossipSub(base):  # type: ignore[misc, valid-type]
        def _perform_opportunistic_grafting(self, topic: str, peers_to_graft: Any) -> int:
            return 0

        def _check_equivocation(self, msg: Any) -> bool:
            key = msg.from_id + msg.seqno
            digest = message_digest(msg)
            seen = self.equivocation_detection.get(key)
            if seen is None:
                # the base class's heartbeat cuts this dict to 500 past 1,000
                self.equivocation_detection[key] = digest
                return True
            if seen != digest:
                log.warning("equivocation: two messages with one sequence number from %s",
                            _b58(msg.from_id))
                if self.scorer is not None:
                    self.scorer.penalize_equivocation(_peer_id(msg.from_id), 100.0)
                return False
            return True

        def _periodic_security_cleanup(self) -> None:
            super()._periodic_security_cleanup()
            cutoff = time.time() - DELIVERY_WINDOW
            for topic, times in list(self.recent_message_deliveries.items()):
                kept = [t for t in times if t > cutoff]
                if kept:
                    times[:] = kept
                else:
                    del self.recent_message_deliveries[topic]

    return LedgerGossipSub


def _pubsub_class(base: Any) -> Any:
    """Pubsub that talks to network members only (see the module docstring)."""

    class LedgerPubsub(base):  # type: ignore[misc, valid-type]
        admits: Callable[[str], bool] = staticmethod(lambda peer: True)
        on_refused: Callable[[], None] | None = None

        async def _admitted(self, peer_id: Any) -> bool:
            name = peer_id.to_base58()
            deadline = trio.current_time() + MEMBER_WAIT
            while not self.admits(name):
                if trio.current_time() >= deadline or not self._peer_is_connected(peer_id):
                    log.debug("pubsub: %s is not a member; no ledger gossip with it", name)
                    if self.on_refused is not None:
                        self.on_refused()
                    return False
                await trio.sleep(0.1)
            return True

        async def _handle_new_peer(self, peer_id: Any) -> None:
            # Every connection comes here, clients' too: no waiting. A peer
            # whose certificate arrives later is taken in by Gossip.admit.
            if peer_id in self.peers or not self.admits(peer_id.to_base58()):
                return
            await super()._handle_new_peer(peer_id)

        async def stream_handler(self, stream: Any) -> None:
            if not await self._admitted(stream.muxed_conn.peer_id):
                await _reset_quietly(stream)
                return
            await super().stream_handler(stream)

        def handle_subscription(self, origin_id: Any, sub_message: Any) -> None:
            if self.admits(origin_id.to_base58()):
                super().handle_subscription(origin_id, sub_message)

    return LedgerPubsub


async def _reset_quietly(stream: Any) -> None:
    try:
        await stream.reset()
    except Exception:  # already closed: nothing left to cut
        log.debug("resetting a pubsub stream failed", exc_info=True)


def _peer_id(raw: bytes) -> Any:
    from libp2p.peer.id import ID

    return ID(raw)


def _b58(raw: bytes) -> str:
    try:
        return str(_peer_id(raw).to_base58())
    except Exception:
        return raw.hex()


def encode_batch(raws: list[bytes]) -> bytes:
    return pack(raws)


def decode_batch(data: bytes) -> list[bytes]:
    """The raw events of a gossip message (ValueError if it is not one)."""
    try:
        obj = unpack(data)
    except Exception as exc:
        raise ValueError(f"not msgpack: {type(exc).__name__}") from exc
    if not isinstance(obj, list) or not all(isinstance(x, bytes) for x in obj):
        raise ValueError("a gossip message is an array of raw events")
    return obj


class Gossip:
    """Publishes local events and delivers received ones.

    Args:
        host: the running libp2p host.
        topic: the pubsub topic (see :func:`topic_for`).
        deliver: called with ``(raw events, origin peer id)`` for each message.
        accept_from: whether a peer id is a member (messages from others are
            dropped, not forwarded).
        on_drop: called when an event could not be queued for publishing.
        on_refused: called when a peer is refused pubsub (not a member).
    """

    def __init__(
        self,
        host: Any,
        topic: str,
        *,
        deliver: Callable[[list[bytes], str], None],
        accept_from: Callable[[str], bool],
        on_drop: Callable[[], None] | None = None,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        self.on_refused = on_refused
        self.host = host
        self.topic = topic
        self.deliver = deliver
        self.accept_from = accept_from
        self.on_drop = on_drop
        self.pubsub: Any = None
        self.router: Any = None
        self._send, self._recv = trio.open_memory_channel[bytes](QUEUE_SIZE)
        self.published = 0
        self.received = 0
        self.started = trio.Event()

    def publish_nowait(self, raw: bytes) -> bool:
        """Queue one event for publishing; False (and counted) if the queue is
        full. Losing a hint is harmless: anti-entropy delivers it later."""
        try:
            self._send.send_nowait(raw)
        except trio.WouldBlock:
            if self.on_drop is not None:
                self.on_drop()
            return False
        return True

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run pubsub until cancelled. Start it before any peer is dialled:
        a pubsub stream opened before the service runs crashes the host."""
        from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
        from libp2p.pubsub.pubsub import Pubsub
        from libp2p.tools.anyio_service import background_trio_service

        tune_pubsub()
        self.router = _router_class(GossipSub)(
            protocols=[PROTOCOL_ID_V11],
            # A small mesh: every extra mesh peer costs a full copy of every
            # message, and py-libp2p's stream stack is CPU-bound (10 nodes:
            # ~27 ms of CPU per event in all, against ~38 ms with degree 3 and
            # no pruning below 12, and 81 copies per event with the defaults).
            degree=3,
            degree_low=2,
            degree_high=6,
            # Pruned peers may graft again after 5 s (default 60 s, during
            # which a node pruned by a busy bootstrap peer can be cut off).
            prune_back_off=5,
            # IP-diversity grafting assumes peers on distinct public IPs; on a
            # LAN or loopback it grafts every peer into the mesh. Adaptive
            # degrees raise the bounds again.
            eclipse_protection_enabled=False,
            adaptive_gossip_enabled=False,
            heartbeat_initial_delay=0.1,
            heartbeat_interval=1,
            spam_protection_enabled=False,
        )
        self.pubsub = _pubsub_class(Pubsub)(self.host, self.router, strict_signing=True)
        self.pubsub.admits = self.accept_from
        self.pubsub.on_refused = self.on_refused
        # Pubsub's own stream handler lets a protobuf DecodeError escape, and
        # an exception escaping a stream handler takes the whole host down:
        # any peer could crash us with one garbage frame. Guard it.
        for protocol in self.router.get_protocols():
            self.host.set_stream_handler(
                protocol, guard_handler("pubsub", self.pubsub.stream_handler))
        async with background_trio_service(self.pubsub), background_trio_service(self.router):
            await self.pubsub.wait_until_ready()
            self.pubsub.set_topic_validator(self.topic, self._validate, False)
            subscription = await self.pubsub.subscribe(self.topic)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, subscription)
                nursery.start_soon(self._publisher)
                self.started.set()
                task_status.started()

    def admit(self, peer_id: str) -> None:
        """``peer_id`` became a member: open pubsub with it if connected."""
        if self.pubsub is None or not self.pubsub.manager.is_running:
            return
        from libp2p.peer.id import ID

        pid = ID.from_base58(peer_id)
        if pid not in self.pubsub.peers and self.pubsub._peer_is_connected(pid):
            self.pubsub._schedule_peer_stream_retry(pid)

    def expel(self, peer_id: str) -> None:
        """``peer_id`` was removed: stop sending it anything at once."""
        if self.pubsub is None or not self.pubsub.manager.is_running:
            return
        from libp2p.peer.id import ID

        pid = ID.from_base58(peer_id)
        stream = self.pubsub.peers.get(pid)
        # forgets its subscriptions, outbound queue and mesh places; a retry
        # it may schedule waits for a membership that never comes back
        self.pubsub._handle_dead_peer(pid)
        if stream is not None:
            self.pubsub.manager.run_task(_reset_quietly, stream)

    def _validate(self, forwarder: Any, msg: Any) -> bool:
        from libp2p.peer.id import ID

        try:
            return self.accept_from(ID(msg.from_id).to_base58())
        except Exception:  # a malformed origin: drop the message
            return False

    async def _reader(self, subscription: Any) -> None:
        from libp2p.peer.id import ID

        me = self.host.get_id().to_base58()
        while True:
            msg = await subscription.get()
            try:
                origin = ID(msg.from_id).to_base58()
            except Exception:
                continue
            if origin == me:
                continue
            try:
                raws = decode_batch(msg.data)
            except ValueError as exc:
                log.warning("malformed ledger gossip from %s: %s", origin, exc)
                continue
            self.received += len(raws)
            # at most DELIVER_BYTES of events per scheduling step: a gateway's
            # usage flush arrives as several events of at most 50 request-log
            # rows, and applying them all at once held a worker's event loop
            # for ~10 ms; small events still go together, in one transaction
            group: list[bytes] = []
            size = 0
            for raw in raws:
                if group and size + len(raw) > DELIVER_BYTES:
                    self.deliver(group, origin)
                    await trio.lowlevel.checkpoint()
                    group, size = [], 0
                group.append(raw)
                size += len(raw)
            self.deliver(group, origin)

    async def _publisher(self) -> None:
        async for first in self._recv:
            batch, size = [first], len(first)
            while len(batch) < MAX_BATCH_EVENTS and size < MAX_BATCH_BYTES:
                try:
                    raw = self._recv.receive_nowait()
                except trio.WouldBlock:
                    break
                batch.append(raw)
                size += len(raw)
            try:
                await self.pubsub.publish(self.topic, encode_batch(batch))
                self.published += len(batch)
            except Exception as exc:  # py-libp2p raises bare exceptions; gossip is a hint
                log.warning("publishing %d ledger events failed: %s: %s", len(batch),
                            type(exc).__name__, exc)
