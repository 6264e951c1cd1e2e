"""Finding the nodes that hold a role or serve a model.

Each member node runs a Kademlia DHT (py-libp2p ``KadDHT``) and announces
one provider record per *topic* it offers: ``role/<role>`` for each of its
roles and ``model/<name>`` for each model (and alias) it serves. A topic key
is the sha2-256 multihash of ``/p2pinfer/<network>/<topic>``, so two networks
never see each other's nodes.

Provider records carry no metadata and live 48 hours in py-libp2p, so they
are only used to *find* candidates: each candidate is then asked for its
**descriptor** over RPC (``getDescriptor``): peer id, addresses, roles,
per-role details (models, load), software version and a timestamp, signed
with the node key. A descriptor is accepted only if its signature matches the
peer id and it is recent.

Authority: anyone can provide a topic on the DHT and sign a descriptor with
its own key, so neither says a node belongs to the network. A descriptor is
used only if its peer is a member with the grant for the topic (``role/r``
needs ``r``; ``model/...`` needs ``inference``), as the node's membership view
(``authority``) says; other descriptors are refused and counted
(``ai_platform_access_refused_total{layer="discovery"}``). A member's
descriptor also carries its certificate and the network owner's public key
(``info["member"]``), so that a client, which has no membership view, can
check a gateway's certificate itself before sending it a credential
(:func:`check_member_descriptor`).

Freshness: descriptors are cached for ``descriptor_ttl`` seconds (15 by
default); a peer whose connection closes is dropped from the cache at once,
and a peer that does not answer ``getDescriptor`` within
``DESCRIPTOR_FETCH_TIMEOUT`` is not listed. A departed peer therefore stops
being listed as soon as its connection closes, and at the latest after
``descriptor_ttl`` seconds.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from . import __version__ as VERSION
from .errors import InvalidParams, P2PInferError, PeerUnavailable, StreamBroken
from .identity import Identity, verify_peer
from .wire import canonical_pack

if TYPE_CHECKING:  # pragma: no cover
    from .rpc.client import RpcClient

__all__ = ["Descriptor", "Discovery", "topic_key", "DESCRIPTOR_MAX_AGE",
           "check_member_descriptor", "required_grant"]

log = logging.getLogger(__name__)

DESCRIPTOR_FETCH_TIMEOUT = 2.0
DESCRIPTOR_MAX_AGE = 300.0
DESCRIPTOR_MAX_SKEW = 60.0
FIND_TIMEOUT = 5.0


def topic_key(network: str, topic: str) -> str:
    """The DHT key of a topic: hex of a sha2-256 multihash (what KadDHT wants)."""
    digest = hashlib.sha256(f"/p2pinfer/{network}/{topic}".encode()).digest()
    return (b"\x12\x20" + digest).hex()


@dataclass(frozen=True)
class Descriptor:
    """A node's signed self-description."""

    peer_id: str
    addrs: tuple[str, ...]
    roles: tuple[str, ...]
    topics: tuple[str, ...]
    info: dict[str, Any]
    version: str
    network: str
    ts: float
    sig: bytes = field(repr=False, default=b"")

    def _unsigned(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "addrs": list(self.addrs),
            "roles": list(self.roles),
            "topics": list(self.topics),
            "info": self.info,
            "version": self.version,
            "network": self.network,
            "ts": self.ts,
        }

    def to_wire(self) -> dict[str, Any]:
        return {**self._unsigned(), "sig": self.sig}

    @classmethod
    def create(
        cls,
        identity: Identity,
        *,
        addrs: list[str],
        roles: list[str],
        topics: list[str],
        info: dict[str, Any],
        network: str,
    ) -> Descriptor:
        unsigned = cls(identity.peer_id, tuple(addrs), tuple(roles), tuple(topics), info,
                       VERSION, network, time.time())
        sig = identity.sign(canonical_pack(unsigned._unsigned()))
        return cls(**{**unsigned.__dict__, "sig": sig})

    @classmethod
    def from_wire(cls, data: Any, *, now: float | None = None) -> Descriptor:
        """Parse and verify a descriptor.

        Raises:
            InvalidParams: malformed, badly signed, too old or from the future.
        """
        if not isinstance(data, dict):
            raise InvalidParams("a descriptor is a map")
        try:
            desc = cls(
                peer_id=_str(data["peer_id"]),
                addrs=tuple(_str(a) for a in _list(data["addrs"])),
                roles=tuple(_str(r) for r in _list(data["roles"])),
                topics=tuple(_str(t) for t in _list(data["topics"])),
                info=_dict(data["info"]),
                version=_str(data["version"]),
                network=_str(data["network"]),
                ts=float(data["ts"]),
                sig=bytes(data["sig"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidParams(f"malformed descriptor: {exc}") from exc
        if not verify_peer(desc.peer_id, canonical_pack(desc._unsigned()), desc.sig):
            raise InvalidParams(f"descriptor of {desc.peer_id} has a bad signature")
        now = time.time() if now is None else now
        if desc.ts < now - DESCRIPTOR_MAX_AGE or desc.ts > now + DESCRIPTOR_MAX_SKEW:
            raise InvalidParams(f"descriptor of {desc.peer_id} is stale or from the future")
        return desc

    def member_proof(self) -> tuple[str, str] | None:
        """The owner public key (hex) and certificate (``p2pc1.``) this node
        carries, if any (unchecked: see :func:`check_member_descriptor`)."""
        member = self.info.get("member")
        if not isinstance(member, dict):
            return None
        owner, cert = member.get("owner"), member.get("cert")
        if isinstance(owner, str) and isinstance(cert, str):
            return owner, cert
        return None

    def models(self) -> list[dict[str, Any]]:
        """The models this node serves (from its inference role), if any."""
        inference = self.info.get("inference")
        if isinstance(inference, dict) and isinstance(inference.get("models"), list):
            return [m for m in inference["models"] if isinstance(m, dict)]
        return []


def required_grant(topic: str) -> str | None:
    """The grant a node needs to be found under ``topic``."""
    kind, _, name = topic.partition("/")
    if kind == "role":
        return name
    if kind == "model":
        return "inference"
    return None


def check_member_descriptor(desc: Descriptor, network: str, owner_key: bytes,
                            role: str | None = None, *, now: float | None = None) -> None:
    """Check, without a membership view, that ``desc`` is a member of
    ``network`` (owned by ``owner_key``) whose certificate grants ``role``.

    Raises:
        UntrustedPeer: no certificate, another network's, not for this
            peer, expired, or not granting ``role``.
    """
    from .errors import UntrustedPeer
    from .ledger.membership import Certificate, NetworkInfo, decode_cert, parse_doc

    if desc.network != network:
        raise UntrustedPeer(f"{desc.peer_id} is in network {desc.network[:64]!r}, "
                            f"not {network}", data={"peer_id": desc.peer_id})
    proof = desc.member_proof()
    if proof is None:
        raise UntrustedPeer(f"{desc.peer_id} shows no member certificate",
                            data={"peer_id": desc.peer_id})
    try:
        info = NetworkInfo(network, owner_key)
        parsed = parse_doc(decode_cert(proof[1]).to_wire(), info)
    except P2PInferError as exc:
        raise UntrustedPeer(f"{desc.peer_id}: its certificate does not check: {exc.message}",
                            data={"peer_id": desc.peer_id}) from exc
    t = time.time() if now is None else now
    if not isinstance(parsed, Certificate) or parsed.peer != desc.peer_id:
        raise UntrustedPeer(f"{desc.peer_id} shows another node's certificate",
                            data={"peer_id": desc.peer_id})
    if parsed.exp < t:
        raise UntrustedPeer(f"the certificate of {desc.peer_id} has expired",
                            data={"peer_id": desc.peer_id})
    if role is not None and role not in parsed.roles:
        raise UntrustedPeer(f"the certificate of {desc.peer_id} does not grant {role}",
                            data={"peer_id": desc.peer_id, "role": role})


def _str(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 4096:
        raise TypeError("expected a string")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list) or len(value) > 1024:
        raise TypeError("expected a list")
    return value


def _dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError("expected a map")
    return value


class Discovery:
    """Announces this node's topics on the DHT and finds other nodes'.

    Args:
        host: the running libp2p host.
        rpc: the node's RPC client (to fetch descriptors).
        local: returns this node's current descriptor.
        network: the network id (namespaces the topic keys).
        dht_server: run the DHT in server mode (member nodes do).
        announce_interval: seconds between re-announcements.
        descriptor_ttl: seconds a fetched descriptor is trusted without asking again.
        authority: what a peer's certificate grants now (empty for a
            non-member); without it every descriptor is used (a node with
            no membership view).
        on_refused: called with ``"not_member"`` or ``"no_grant"`` for each
            descriptor refused.
    """

    def __init__(
        self,
        host: Any,
        rpc: RpcClient,
        local: Callable[[], Descriptor],
        *,
        network: str,
        dht_server: bool = True,
        announce_interval: float = 30.0,
        descriptor_ttl: float = 15.0,
        authority: Callable[[str], frozenset[str]] | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.authority = authority
        self.on_refused = on_refused
        self.host = host
        self.rpc = rpc
        self.local = local
        self.network = network
        self.dht_server = dht_server
        self.announce_interval = announce_interval
        self.descriptor_ttl = descriptor_ttl
        self.dht: Any = None
        self._cache: dict[str, tuple[float, Descriptor]] = {}
        self._announced: set[str] = set()
        self._announce_now = trio.Event()
        self.started = trio.Event()
        self.lookups = 0
        self.announcements = 0

    # -- lifecycle -------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
        from libp2p.tools.anyio_service import background_trio_service

        mode = DHTMode.SERVER if self.dht_server else DHTMode.CLIENT
        self.dht = KadDHT(self.host, mode, max_peers_per_subnet=0)
        self._members_only_routing(self.dht.routing_table)
        async with background_trio_service(self.dht):
            self.started.set()
            task_status.started()
            await self._announce_loop()

    def _members_only_routing(self, table: Any) -> None:
        """Only members enter the routing table.

        py-libp2p adds every peer that talks to the DHT, and then sends each
        announcement (ADD_PROVIDER) to the closest of them, for ever: after a
        thousand CLI runs a hub kept dialling the departed clients, about 150
        failed dials per announcement. Non-members have no place in the
        table: their records would be refused anyway.
        """
        if self.authority is None:
            return
        original = table.add_peer
        authority = self.authority

        async def add_member(peer: Any, *args: Any, **kwargs: Any) -> bool:
            peer_id = getattr(peer, "peer_id", peer)
            if not authority(peer_id.to_base58()):
                return False
            return bool(await original(peer, *args, **kwargs))

        table.add_peer = add_member

    def expel(self, peer_id: str) -> None:
        """Drop a peer from the routing table (it was removed from the network)."""
        if self.dht is None:
            return
        from libp2p.peer.id import ID

        try:
            self.dht.routing_table.remove_peer(ID.from_base58(peer_id))
        except Exception:
            log.debug("could not drop %s from the routing table", peer_id, exc_info=True)

    async def add_peer(self, peer_id: str) -> None:
        """Put a connected peer in the routing table (after a bootstrap dial)."""
        if self.dht is None:
            return
        from libp2p.peer.id import ID

        try:
            await self.dht.add_peer(ID.from_base58(peer_id))
        except Exception:
            log.debug("could not add %s to the routing table", peer_id, exc_info=True)

    async def refresh(self) -> None:
        if self.dht is not None:
            with trio.move_on_after(FIND_TIMEOUT):
                try:
                    await self.dht.refresh_routing_table()
                except Exception:
                    log.debug("routing table refresh failed", exc_info=True)

    def request_announce(self) -> None:
        """Announce again soon (topics changed, or a new peer joined)."""
        self._announce_now.set()

    async def _announce_loop(self) -> None:
        while True:
            await self.announce()
            with trio.move_on_after(self.announce_interval):
                await self._announce_now.wait()
            self._announce_now = trio.Event()

    async def announce(self) -> None:
        """Provide every topic of this node on the DHT."""
        if self.dht is None or not self.dht_server:
            return
        topics = self.local().topics
        for topic in topics:
            try:
                with trio.move_on_after(FIND_TIMEOUT):
                    await self.dht.provide(topic_key(self.network, topic))
                    self.announcements += 1
            except Exception:
                log.debug("announcing %s failed", topic, exc_info=True)
        self._announced = set(topics)

    # -- lookups ---------------------------------------------------------------
    def forget(self, peer_id: str) -> None:
        """Drop a peer from the descriptor cache (its connection closed)."""
        self._cache.pop(peer_id, None)

    def cached(self) -> list[Descriptor]:
        now = trio.current_time()
        return [d for exp, d in self._cache.values() if exp > now]

    async def find_role(self, role: str) -> list[Descriptor]:
        """Fresh, verified descriptors of every reachable node holding ``role``."""
        return await self.find(f"role/{role}")

    async def find_model(self, name: str) -> list[Descriptor]:
        """Fresh, verified descriptors of every reachable node serving ``name``."""
        return await self.find(f"model/{name}")

    async def find(self, topic: str) -> list[Descriptor]:
        self.lookups += 1
        local = self.local()
        found: dict[str, Descriptor] = {}
        if topic in local.topics:
            found[local.peer_id] = local
        candidates: list[str] = []
        if self.dht is not None:
            with trio.move_on_after(FIND_TIMEOUT):
                try:
                    providers = await self.dht.find_providers(topic_key(self.network, topic))
                except Exception:
                    log.debug("find_providers(%s) failed", topic, exc_info=True)
                    providers = []
                for info in providers:
                    pid = info.peer_id.to_base58()
                    if pid == local.peer_id or pid in candidates:
                        continue
                    if not self._granted(pid, topic):  # never even asked
                        continue
                    candidates.append(pid)
                    if info.addrs:
                        self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 600)
        async with trio.open_nursery() as nursery:
            for pid in candidates:
                nursery.start_soon(self._collect, pid, topic, found)
        return sorted(found.values(), key=lambda d: d.peer_id)

    def _granted(self, peer_id: str, topic: str) -> bool:
        """Whether ``peer_id`` may be found under ``topic`` (counted if not)."""
        if self.authority is None:
            return True
        grants = self.authority(peer_id)
        if not grants:
            self._refuse("not_member", peer_id, topic)
            return False
        needed = required_grant(topic)
        if needed is not None and needed not in grants:
            self._refuse("no_grant", peer_id, topic)
            return False
        return True

    def _refuse(self, reason: str, peer_id: str, topic: str) -> None:
        # debug: a standing impostor would log once per lookup; the metric counts
        log.debug("discovery: ignoring %s under %s (%s)", peer_id, topic,
                 "not a member" if reason == "not_member" else "not granted")
        if self.on_refused is not None:
            self.on_refused(reason)

    async def _collect(self, peer_id: str, topic: str, found: dict[str, Descriptor]) -> None:
        desc = await self.descriptor(peer_id)
        # checked again: the membership may have changed while we asked
        if desc is not None and topic in desc.topics and self._granted(peer_id, topic):
            found[peer_id] = desc

    async def descriptor(self, peer_id: str) -> Descriptor | None:
        """The peer's descriptor, from cache or asked over RPC; None if it
        does not answer in time or answers with a bad one."""
        now = trio.current_time()
        hit = self._cache.get(peer_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            with trio.fail_after(DESCRIPTOR_FETCH_TIMEOUT):
                try:
                    raw = await self.rpc.call(peer_id, "getDescriptor")
                except (StreamBroken, PeerUnavailable):
                    # the connection under the call was closed: a peer that
                    # redialled (new address, restart) has its newer one kept
                    # and the older closed, so the first call may land on it
                    raw = await self.rpc.call(peer_id, "getDescriptor")
            desc = Descriptor.from_wire(raw)
        except (P2PInferError, trio.TooSlowError) as exc:
            log.debug("no descriptor from %s: %s", peer_id, exc)
            self._cache.pop(peer_id, None)
            return None
        if desc.peer_id != peer_id or desc.network != self.network:
            log.info("peer %s sent a descriptor for %s/%s", peer_id, desc.peer_id, desc.network)
            return None
        self._cache[peer_id] = (trio.current_time() + self.descriptor_ttl, desc)
        return desc
