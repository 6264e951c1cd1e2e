"""A p2pinfer node: one libp2p host running any set of roles.

:class:`Node` composes, in start order:

1. the libp2p host (Noise only, yamux) with the RPC protocol handler;
2. the RPC client;
3. the ledger (SQLite store, membership, replication), which also decides
   who is a network member;
4. discovery (KadDHT + signed descriptors), then the bootstrap dials;
5. the roles, each started with ``nursery.start(role.run)``;
6. the scaling monitor (:mod:`p2pinfer.scaling`), if ``[scaling]`` gives it
   anything to watch.

``await nursery.start(node.run)`` returns once all of that is serving.
Cancelling ``run`` (Ctrl-C, SIGTERM in the daemon) shuts everything down.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from . import __version__
from .addresses import check_ports_free
from .config import NodeConfig
from .context import Role, RoleContext
from .credentials import Authenticator
from .discovery import Descriptor, Discovery
from .errors import ConfigError, InvalidParams, P2PInferError
from .grants import ALL_GRANTS, ROLES
from .homelock import HomeLock
from .identity import Identity
from .ledger import Ledger
from .links import Links
from .metrics.node_metrics import NodeMetrics
from .rpc import RPC_PROTOCOL, Access, CallContext, RpcClient, RpcServer, make_host, rpc_method
from .rpc.connections import ConnectionKeeper, steer_streams
from .rpc.host import guard_handler, parse_multiaddr

__all__ = ["Node", "Role", "ROLE_CLASSES"]

log = logging.getLogger(__name__)

# Roles are imported lazily: a gateway-only node never imports llama.cpp.
ROLE_CLASSES: dict[str, str] = {
    "auth": "p2pinfer.auth.role:AuthRole",
    "gateway": "p2pinfer.gateway.role:GatewayRole",
    "inference": "p2pinfer.inference.role:InferenceRole",
    "metrics": "p2pinfer.metrics.role:MetricsRole",
    "web": "p2pinfer.web.role:WebRole",
}

NODE_ROLES = frozenset(ROLES)

# What a non-member peer may look up through ``findPeers``: the entry points.
PUBLIC_ROLES = ("gateway", "web")
def load_role_class(name: str) -> Callable[[RoleContext], Role]:
    try:
        target = ROLE_CLASSES[name]
    except KeyError:
        raise ConfigError(f"node.roles: unknown role {name!r}") from None
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    factory: Callable[[RoleContext], Role] = getattr(module, attr)
    return factory


class _Notifee:
    """Forwards libp2p connection events to the node."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def connected(self, network: Any, conn: Any) -> None:
        self.node._on_connected(conn.muxed_conn.peer_id.to_base58())

    async def disconnected(self, network: Any, conn: Any) -> None:
        self.node._on_disconnected(conn.muxed_conn.peer_id.to_base58())

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass


class Node:
    """One p2pinfer node.

    Args:
        config: the node's configuration.
        identity: the node key (default: ``<home>/node.key``, created on first use).
        registry: the Prometheus registry the node's metrics go to (default: a
            new one per node, never the global registry).
        role_factories: optional overrides ``{role name: callable(context) -> role}``,
            for embedding a custom role implementation; the callable gets the
            node as a :class:`~p2pinfer.context.RoleContext`.
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        identity: Identity | None = None,
        registry: CollectorRegistry | None = None,
        role_factories: dict[str, Callable[[RoleContext], Role]] | None = None,
    ) -> None:
        self.config = config
        self.identity = identity or Identity.load_or_create(config.home)
        self.peer_id = self.identity.peer_id
        self.registry = registry if registry is not None else CollectorRegistry()
        self.started_at = time.time()
        self.host = make_host(
            self.identity, announce_addrs=config.announce, enable_mdns=config.enable_mdns,
            max_inbound_per_ip=config.max_inbound_per_ip,
            dead_link_timeout=config.dead_link_timeout,
            on_dial=lambda ok: self.metrics.dialled(ok),
        )
        self.rpc_server = RpcServer(
            is_member=self.is_member,
            grants_of=self.grants_of,
            max_frame=config.max_frame,
            max_streams_per_peer=config.max_streams_per_peer,
            stall_timeout=config.stall_timeout,
        )
        self.rpc = RpcClient(self.host, max_frame=config.max_frame)
        steer_streams(self.host)
        self.connections = ConnectionKeeper(self.host, self.peer_id, is_node=self.is_node,
                                            moved=self.rpc.retire)
        # Called with a peer id when its last connection closes (e.g. the
        # gateway returns the quota tickets a vanished gateway held).
        self.disconnect_listeners: list[Callable[[str], None]] = []
        # Node-wide metrics, kept by every node whatever its roles (see
        # p2pinfer.metrics): set up here, before the ledger and the roles.
        self.metrics: NodeMetrics = NodeMetrics(self, self.rpc_server)
        # The ledger owns the store and membership (see p2pinfer.ledger).
        self.ledger: Ledger = Ledger.for_node(self)
        # One per node: the gateway, web and auth roles share its throttles.
        self.authenticator = Authenticator(self)
        self.discovery = Discovery(
            self.host,
            self.rpc,
            self.descriptor,
            network=self.network_id,
            dht_server=config.dht_server,
            announce_interval=config.announce_interval,
            descriptor_ttl=config.descriptor_ttl,
            authority=self.grants_of,
            on_refused=lambda reason: self.metrics.refused("discovery", reason),
        )
        factories = role_factories or {}
        self.roles: dict[str, Role] = {}
        for name in config.roles:
            factory = factories.get(name) or load_role_class(name)
            self.roles[name] = factory(self)
        # Scaling triggers, hook and slot autoscaling: watches the
        # inference engine and/or the metrics role's collection rounds.
        from .scaling import Scaling

        self.scaling: Scaling | None = Scaling.for_node(self)
        if self.scaling is not None:
            self.metrics.scaling_status = self.scaling.status
        self.rpc_server.register(self)
        self.rpc.serve_locally(self.peer_id, self.rpc_server)
        for role in self.roles.values():
            self.rpc_server.register(role)
        self.ready = trio.Event()
        self._descriptor: tuple[float, Descriptor] | None = None
        self._cancel_scope: trio.CancelScope | None = None
        # bootstrap peers and known members, dialled and redialled for ever
        self.links = Links(self, keep=config.keep_links, clock=time.time)
        self.metrics.problem_sources.append(self.links.problems)
        self._nursery: trio.Nursery | None = None
        #: set when this node learns the network owner removed it
        self.removed = False
        self.ledger.store.membership_listeners.append(self._on_membership)
        if self.ledger.gossip is not None:
            self.ledger.gossip.on_refused = (
                lambda: self.metrics.refused("pubsub", "not_member"))

    # -- what roles may use (p2pinfer.context.RoleContext) --------------------------
    @property
    def role_names(self) -> frozenset[str]:
        """The roles this node runs."""
        return frozenset(self.roles)

    def local_role(self, name: str) -> Role | None:
        """The role ``name`` of this node, or None."""
        return self.roles.get(name)

    def serve(self, handler: object) -> None:
        """Serve the ``@rpc_method`` methods of ``handler`` on this node."""
        self.rpc_server.register(handler)

    def on_disconnect(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(peer_id)`` once a peer's last connection closes."""
        self.disconnect_listeners.append(listener)

    async def serve_local(self, path: Path, *,
                          task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve this node's RPC methods on a unix socket at ``path``, as
        calls from the node itself (see :mod:`p2pinfer.rpc.local_socket`)."""
        from .rpc.local_socket import serve_local

        await serve_local(self.rpc_server, path, self.peer_id, task_status=task_status)

    # -- membership --------------------------------------------------------------
    @property
    def network_id(self) -> str:
        return str(self.ledger.network_id)

    def is_member(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is an admitted member of this node's network."""
        if peer_id == self.peer_id:
            return True
        return bool(self.ledger.is_member(peer_id))

    def is_node(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is a member node: its certificate grants a node
        role (an operator key or a role-less member is a member, not a node:
        it connects for a command and leaves)."""
        return bool(self.grants_of(peer_id) & NODE_ROLES)

    def grants_of(self, peer_id: str) -> frozenset[str]:
        """What ``peer_id``'s certificate lets it do here (every grant for
        this node itself, none for a non-member or a removed node)."""
        if peer_id == self.peer_id:
            return ALL_GRANTS
        return frozenset(self.ledger.grants_of(peer_id))

    # -- addresses and descriptor -----------------------------------------------
    @property
    def addrs(self) -> list[str]:
        """The multiaddrs other machines can dial this node at, each ending
        in ``/p2p/<peer id>`` (``[node] announce``, else the listen addresses
        as :mod:`p2pinfer.addresses` picks them)."""
        out = []
        for addr in self.host.get_addrs():
            text = str(addr)
            out.append(text if "/p2p/" in text else f"{text}/p2p/{self.peer_id}")
        return out

    def topics(self) -> list[str]:
        topics = [f"role/{name}" for name in self.roles]
        for role in self.roles.values():
            topics.extend(t for t in role.topics() if t not in topics)
        return topics

    def descriptor(self) -> Descriptor:
        """This node's signed descriptor (re-signed at most once a second)."""
        now = trio.current_time()
        if self._descriptor is not None and self._descriptor[0] > now:
            return self._descriptor[1]
        info: dict[str, Any] = {}
        for name, role in self.roles.items():
            try:
                info[name] = role.describe()
            except Exception:
                log.exception("role %s failed to describe itself", name)
        # what lets a client check us without a membership view
        from .ledger.membership import encode_cert

        info["member"] = {"owner": self.ledger.network.owner_public_key.hex(),
                          "cert": encode_cert(self.ledger.own_cert)}
        desc = Descriptor.create(
            self.identity,
            addrs=self.addrs,
            roles=list(self.roles),
            topics=self.topics(),
            info=info,
            network=self.network_id,
        )
        self._descriptor = (now + 1.0, desc)
        return desc

    def invalidate_descriptor(self) -> None:
        """Something in the descriptor changed (e.g. a model loaded)."""
        self._descriptor = None
        self.discovery.request_announce()

    # -- RPC served by every node -----------------------------------------------
    @rpc_method("getDescriptor", access=Access.PUBLIC)
    async def rpc_get_descriptor(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """This node's signed descriptor."""
        return self.descriptor().to_wire()

    @rpc_method("findPeers", access=Access.PUBLIC)
    async def rpc_find_peers(self, ctx: CallContext, params: Any) -> list[dict[str, Any]]:
        """Descriptors of nodes with a role (``{"role": ...}``) or serving a
        model (``{"model": ...}``). Non-members may only look up entry points
        (gateway and web roles)."""
        if not isinstance(params, dict) or len(params) != 1:
            raise InvalidParams('findPeers takes {"role": name} or {"model": name}')
        if "role" in params:
            role = params["role"]
            if not isinstance(role, str) or role not in ROLE_CLASSES:
                raise InvalidParams(f"role must be one of {', '.join(ROLE_CLASSES)}")
            if not ctx.is_member and role not in PUBLIC_ROLES:
                from .errors import NotMember

                raise NotMember(f"non-members may look up only {', '.join(PUBLIC_ROLES)} nodes")
            found = await self.discovery.find_role(role)
        elif "model" in params:
            model = params["model"]
            if not isinstance(model, str) or not 0 < len(model) <= 200:
                raise InvalidParams("model must be a non-empty string of at most 200 characters")
            if not ctx.is_member:
                from .errors import NotMember

                raise NotMember("model lookups are for network members")
            found = await self.discovery.find_model(model)
        else:
            raise InvalidParams('findPeers takes {"role": name} or {"model": name}')
        return [d.to_wire() for d in found]

    @rpc_method("ping", access=Access.PUBLIC)
    async def rpc_ping(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """Liveness: peer id, version, uptime, whether the caller is a member."""
        return {
            "peer_id": self.peer_id,
            "version": __version__,
            "uptime": time.time() - self.started_at,
            "member": ctx.is_member,
            "network": self.network_id,
        }

    # -- membership changes ----------------------------------------------------------
    def _on_membership(self, peer_id: str, removed: bool) -> None:
        """A certificate or removal was applied (from any path: an event,
        anti-entropy, ``ledgerHello``)."""
        if peer_id == self.peer_id:
            if removed and not self.removed:
                self.removed = True
                log.error("this node (%s) was removed from network %s by its owner: it "
                          "stops serving; its peer id can never rejoin (the owner can admit "
                          "a new node key)", self.peer_id, self.network_id)
                self.stop()
            return
        gossip = self.ledger.gossip
        if removed:
            if gossip is not None:
                gossip.expel(peer_id)
            self.links.removed(peer_id)
            self.discovery.expel(peer_id)
            self._schedule_cut_off(peer_id)
        elif self.is_member(peer_id):
            if gossip is not None:
                gossip.admit(peer_id)
            # its certificate often arrives just after its connection
            if self._nursery is not None and self.is_node(peer_id) \
                    and peer_id in self.connected_peers():
                self._nursery.start_soon(self._learn_addrs, peer_id)

    def removed_peer(self, peer_id: str) -> bool:
        """Whether the owner removed ``peer_id`` from the network."""
        return self.ledger.store.membership.cutoff(peer_id) is not None


    def _schedule_cut_off(self, peer_id: str) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._cut_off, peer_id)

    async def _cut_off(self, peer_id: str) -> None:
        """Close every connection of a removed node, after handing it its
        removal (so it knows, and stops) if it still answers within 0.5 s."""
        if peer_id not in self.connected_peers():
            return
        from libp2p.peer.id import ID

        self.metrics.refused("connection", "removed")
        docs = [d.to_wire() for d in self.ledger.store.membership.docs_of(peer_id)
                if d.doc.get("t") == "removal"]
        with trio.move_on_after(0.5):
            try:
                await self.rpc.call(peer_id, "ledgerHello", {"net": self.network_id,
                                                             "docs": docs})
            except P2PInferError:
                pass  # it learns from the closed connections instead
        with trio.move_on_after(2):
            try:
                await self.host.disconnect(ID.from_base58(peer_id))
            except Exception:
                log.debug("disconnecting removed node %s failed", peer_id, exc_info=True)
        log.info("closed the connections of removed node %s", peer_id)

    # -- connections ----------------------------------------------------------------
    def _on_connected(self, peer_id: str) -> None:
        if self.removed_peer(peer_id):
            self._schedule_cut_off(peer_id)
            return
        self.ledger.on_peer_connected(peer_id)
        if self._nursery is not None and self.is_node(peer_id):
            self._nursery.start_soon(self._learn_addrs, peer_id)
        if self._nursery is not None:
            self._nursery.start_soon(self.connections.settle, peer_id, self._nursery)

    async def _learn_addrs(self, peer_id: str) -> None:
        """Remember where a member that just connected announces itself."""
        desc = await self.discovery.descriptor(peer_id)
        if desc is not None and self.is_node(peer_id):
            self.links.learned(peer_id, list(desc.addrs))

    def on_link_closed(self, peer_id: str) -> None:
        """This node closed its connection to ``peer_id`` itself (the swarm
        may not report it): act as on a disconnection unless it is back."""
        if peer_id not in self.connected_peers():
            self._on_disconnected(peer_id)

    def _on_disconnected(self, peer_id: str) -> None:
        self.discovery.forget(peer_id)
        if peer_id in self.connected_peers():
            # one of two connections closed (a redial, or a duplicate retired):
            # the peer stays. Our RPC stream to it, if it was on that
            # connection, broke with it and reopens on the next call; if it
            # is on the other one, answers may be streaming on it: keep it.
            return
        self.rpc.drop(peer_id)
        self.links.disconnected(peer_id)
        if not self.is_member(peer_id):
            self._forget_peer(peer_id)
        cancelled = self.rpc_server.peer_gone(peer_id)
        if cancelled:
            log.info("%s left: cancelled its %d call(s) in flight", peer_id[-8:], cancelled)
        # e.g. the quota book returns the tickets the peer held: only once it
        # is really gone, or the requests it still runs would go uncounted
        for listener in self.disconnect_listeners:
            try:
                listener(peer_id)
            except Exception:
                log.exception("disconnect listener failed")

    def _forget_peer(self, peer_id: str) -> None:
        """Forget a client (any non-member) that left.

        py-libp2p keeps every peer it ever saw in its peerstore, and its DHT
        falls back on the peerstore when its routing table is small (any
        swarm of a few nodes): each announcement then dialled every client
        that had come and gone, 150 failed dials every 30 s after a hundred
        CLI runs, growing with each run."""
        from libp2p.peer.id import ID

        self.discovery.expel(peer_id)
        try:
            self.host.get_peerstore().clear_peerdata(ID.from_base58(peer_id))
        except Exception:
            log.debug("could not forget peer %s", peer_id, exc_info=True)

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self.host.get_connected_peers()]

    async def connect(self, addr: str) -> str:
        """Dial a peer by multiaddr and add it to the DHT routing table."""
        peer_id = await self.rpc.connect(addr)
        await self.discovery.add_peer(peer_id)
        return peer_id

    def bootstrap_addrs(self) -> list[str]:
        """Where to join: the configured bootstrap peers, else the ones the
        network's join token named (``network.json``); never this node."""
        addrs = list(self.config.bootstrap)
        if not addrs:
            addrs = list(self.ledger.network.bootstrap)
        return [a for a in addrs if not a.endswith("/p2p/" + self.peer_id)]

    # -- lifecycle ------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the node until cancelled.

        Raises:
            ConfigError: the network owner removed this node, another
                node runs on its home (:mod:`p2pinfer.homelock`), or a
                listen port is in use.
        """
        if self.removed_peer(self.peer_id):
            raise ConfigError(
                f"this node ({self.peer_id}) was removed from network {self.network_id} by "
                "its owner: its peer id can never rejoin; ask the owner to admit a new node "
                "key (p2pinfer network admit)")
        listen = [parse_multiaddr(a) for a in self.config.listen]
        lock = HomeLock(self.config.home)
        await lock.acquire()
        try:
            check_ports_free(listen)
            await self._run_locked(listen, task_status)
        finally:
            lock.release()

    async def _run_locked(self, listen: list[Any], task_status: Any) -> None:
        with trio.CancelScope() as scope:
            self._cancel_scope = scope
            async with self.host.run(listen_addrs=listen):
                self.host.set_stream_handler(
                    RPC_PROTOCOL, guard_handler("rpc", self.rpc_server.handle_stream)
                )
                self.host.get_network().register_notifee(_Notifee(self))
                try:
                    await self._run_services(task_status)
                finally:
                    # host.run() leaves connections to the GC: close them now so
                    # peers see us leave at once instead of a silent socket.
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        try:
                            await self.host.close()
                        except Exception:
                            log.debug("closing the host failed", exc_info=True)

    async def _run_services(self, task_status: Any) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.rpc.run)
            await nursery.start(self.ledger.run)
            await nursery.start(self.discovery.run)
            await nursery.start(self.links.run, self.bootstrap_addrs())
            for name, role in self.roles.items():
                log.debug("starting role %s", name)
                await nursery.start(role.run)
            if self.scaling is not None:
                await nursery.start(self.scaling.run)
            self.invalidate_descriptor()
            log.info("node %s up on %s with roles %s", self.peer_id,
                     ", ".join(self.addrs), ", ".join(self.roles) or "none")
            self.ready.set()
            task_status.started()
            await trio.sleep_forever()

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
