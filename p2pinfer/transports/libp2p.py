"""The SDK's peer-to-peer transport: the swarm's nodes, called over libp2p.

The transport runs a small libp2p host of its own (Noise-encrypted, like
every node), dials the bootstrap nodes, finds the nodes with the role an
operation needs and calls the RPC method :data:`ROUTES` names, failing over
between those nodes. It is not a network member and needs no certificate:
the credential authenticates each request. It sends one only to a node
whose certificate, signed by the network owner, grants the role it is asked
for: the owner key is the one the bootstrap node proves its own membership
with, and ``network`` pins which network that must be. A node that cannot
show one is never called (``UntrustedPeer`` when no node is left).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import trio

from ..errors import (
    AuthenticationRequired,
    ConfigError,
    InvalidParams,
    NotMember,
    NoWorkerAvailable,
    P2PInferError,
    PeerUnavailable,
    StreamBroken,
    UnknownMethod,
    UntrustedPeer,
)
from ..identity import Identity
from . import AnswerStream, Credential, Transport, text_chunk

if TYPE_CHECKING:  # pragma: no cover
    from ..discovery import Descriptor

__all__ = ["ROLES", "ROUTES", "Libp2pTransport", "RpcAnswer", "RpcRoute"]

# Seconds a list of gateways (or other nodes) found through the bootstrap
# nodes is reused before asking again.
DISCOVERY_REFRESH = 30.0
# Seconds to dial one bootstrap node and read its descriptor.
BOOTSTRAP_TIMEOUT = 10.0
ROLES = ("auth", "gateway", "inference", "metrics", "web")


@dataclass(frozen=True)
class RpcRoute:
    """The RPC method an operation calls, on a node with ``role``.

    ``credential`` says where the credential goes: ``"auth"`` (as
    ``params["auth"]``), ``"token"`` (a session token as
    ``params["token"]``), ``"inline"`` (its ``token`` or ``api_key`` among
    the parameters) or ``"none"``. ``request``: the parameters travel as
    ``params["request"]``; ``bare``: the method takes no parameters (nil).
    """

    role: str
    method: str
    credential: Literal["auth", "token", "inline", "none"] = "none"
    request: bool = False
    bare: bool = False

    def params(self, params: dict[str, Any], credential: Credential | None) -> Any:
        """The RPC parameters that carry ``params`` and ``credential``.

        Raises:
            AuthenticationRequired: a session token is needed and
                ``credential`` is an API key.
        """
        if self.bare:
            return None
        body: dict[str, Any] = {"request": dict(params)} if self.request else dict(params)
        if credential is None or self.credential == "none":
            return body
        if self.credential == "auth":
            return {**body, "auth": credential.rpc()} if self.request \
                else {"auth": credential.rpc(), **body}
        if self.credential == "token":
            if credential.kind != "token":
                raise AuthenticationRequired(f"{self.method} needs a session token: log in first")
            return {"token": credential.secret, **body}
        return {**credential.rpc(), **body}


#: The RPC method of each operation (see :class:`RpcRoute`).
ROUTES: dict[str, RpcRoute] = {
    "embed": RpcRoute("gateway", "processEmbeddingRequest", "auth", request=True),
    "models": RpcRoute("gateway", "listModels", "auth"),
    "quota": RpcRoute("gateway", "getUserQuota", "auth"),
    "usage": RpcRoute("gateway", "getUsage", "auth"),
    "health": RpcRoute("gateway", "getServiceHealth"),
    "system_health": RpcRoute("metrics", "getSystemHealth", bare=True),
    "register": RpcRoute("auth", "registerUser"),
    "login": RpcRoute("auth", "loginUser"),
    "refresh": RpcRoute("auth", "refreshToken"),
    "logout": RpcRoute("auth", "logoutUser", "token"),
    "logout_everywhere": RpcRoute("auth", "logoutEverywhere", "token"),
    "change_password": RpcRoute("auth", "changePassword", "token"),
    "me": RpcRoute("auth", "getUser", "inline"),
    "create_api_key": RpcRoute("auth", "generateApiKey", "token"),
    "api_keys": RpcRoute("auth", "listApiKeys", "inline"),
    "revoke_api_key": RpcRoute("auth", "revokeApiKey", "token"),
    "export_data": RpcRoute("auth", "exportUserData", "token"),
    "erase_account": RpcRoute("auth", "eraseUser", "token"),
}


async def _close_host(host: Any) -> None:
    """Close the host's connections before its nursery ends: py-libp2p leaves
    them to the GC, and the nodes would see a silent socket instead of a
    client that left."""
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        try:
            await host.close()
        except Exception:  # closing is best effort: the process may be exiting
            return


class RpcAnswer(AnswerStream):
    """An answer streamed by a gateway's ``processInferenceRequest``."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.trailer: dict[str, Any] | None = None

    async def __anext__(self) -> dict[str, Any]:
        try:
            chunk = await self._stream.__anext__()
        except StopAsyncIteration:
            trailer = self._stream.trailer
            self.trailer = trailer if isinstance(trailer, dict) else None
            raise
        return text_chunk(chunk)

    async def aclose(self) -> None:
        """End the call (the gateway cancels the request if it still runs)."""
        await self._stream.__aexit__(None, None, None)


class Libp2pTransport(Transport):
    """The swarm reached through its bootstrap nodes (see the module docstring).

    Args:
        bootstrap: multiaddrs (ending in ``/p2p/<peer id>``) of nodes to dial.
        identity: the client's libp2p key (a fresh one by default).
        network: the network id the swarm must belong to (default: the
            first bootstrap node's, once it proves it is a member).

    Raises:
        ConfigError: no bootstrap address.
    """

    def __init__(self, bootstrap: Sequence[str], *, identity: Identity | None = None,
                 network: str | None = None) -> None:
        if not bootstrap:
            raise ConfigError("the libp2p transport needs bootstrap addresses")
        self.bootstrap = list(bootstrap)
        self.identity = identity
        #: the network id: pinned, or learnt from the first bootstrap node
        self.network = network
        #: nodes not used because they showed no valid certificate, by peer id
        self.untrusted: dict[str, str] = {}
        #: the RPC client, while the transport is open
        self.rpc: Any = None
        self._owner_key: bytes | None = None
        self._host: Any = None
        self._entry: dict[str, Descriptor] = {}   # bootstrap peer id -> its descriptor
        self._entry_errors: list[str] = []
        self._found: dict[str, tuple[float, list[Descriptor]]] = {}

    # -- lifecycle -------------------------------------------------------------------
    async def connect(self, stack: AsyncExitStack) -> None:
        """Start the libp2p host and the RPC client on it."""
        import multiaddr

        from ..rpc import RpcClient, make_host

        self._host = make_host(self.identity or Identity.generate())
        await stack.enter_async_context(self._host.run(
            listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
        stack.push_async_callback(_close_host, self._host)
        self.rpc = await stack.enter_async_context(RpcClient.open(self._host))
        stack.callback(setattr, self, "rpc", None)

    def _need_open(self) -> None:
        if self.rpc is None:
            raise RuntimeError("use the client as `async with Client(...) as client` "
                               "(a transport: `async with transport`)")

    # -- finding nodes ---------------------------------------------------------------------
    async def entry_points(self) -> dict[str, Descriptor]:
        """Dial every bootstrap node (once) and read its descriptor."""
        self._need_open()
        if self._entry:
            return self._entry
        from ..discovery import Descriptor

        errors: list[str] = []
        untrusted: list[str] = []
        for addr in self.bootstrap:
            try:
                with trio.fail_after(BOOTSTRAP_TIMEOUT):
                    peer = await self.rpc.connect(addr)
                    desc = Descriptor.from_wire(await self.rpc.call(peer, "getDescriptor"))
                self._trust_entry(desc)
                self._entry[peer] = desc
            except trio.TooSlowError:
                errors.append(f"{addr}: no answer within {BOOTSTRAP_TIMEOUT:.0f} s")
            except UntrustedPeer as exc:
                untrusted.append(f"{addr}: {exc.message}")
                self.untrusted[str(exc.data.get("peer_id", addr))] = exc.message
            except P2PInferError as exc:
                errors.append(f"{addr}: {exc.message}")
        self._entry_errors = errors + untrusted
        if not self._entry and untrusted:
            raise UntrustedPeer("no bootstrap node proves it is a member of the network: "
                                + "; ".join(untrusted), data={"bootstrap": list(self.bootstrap)})
        if not self._entry:
            raise PeerUnavailable("cannot reach any bootstrap node: " + "; ".join(errors),
                                  data={"bootstrap": list(self.bootstrap)})
        return self._entry

    def _trust_entry(self, desc: Descriptor) -> None:
        """Learn the owner key from a bootstrap node that proves, with it,
        that it is a member of the (pinned) network.

        Raises:
            UntrustedPeer: another network, or no valid certificate.
        """
        from ..discovery import check_member_descriptor
        from ..ledger.membership import network_id_for

        if self.network is not None and desc.network != self.network:
            raise UntrustedPeer(f"bootstrap node {desc.peer_id} is in network "
                                f"{desc.network[:64]!r}, not {self.network}",
                                data={"peer_id": desc.peer_id})
        proof = desc.member_proof()
        try:
            owner = bytes.fromhex(proof[0]) if proof else b""
        except ValueError:
            owner = b""
        if self._owner_key is not None and owner != self._owner_key:
            raise UntrustedPeer(f"bootstrap node {desc.peer_id} names another network owner",
                                data={"peer_id": desc.peer_id})
        if network_id_for(owner) != desc.network:
            raise UntrustedPeer(f"bootstrap node {desc.peer_id} shows no owner key of its "
                                "network", data={"peer_id": desc.peer_id})
        check_member_descriptor(desc, desc.network, owner)
        self.network, self._owner_key = desc.network, owner

    def _trusted(self, desc: Descriptor, role: str) -> bool:
        """Whether ``desc``'s certificate grants ``role`` in our network."""
        from ..discovery import check_member_descriptor

        assert self.network is not None and self._owner_key is not None
        try:
            check_member_descriptor(desc, self.network, self._owner_key, role)
        except UntrustedPeer as exc:
            self.untrusted[desc.peer_id] = exc.message
            return False
        return True

    async def find(self, role: str) -> list[Descriptor]:
        """Descriptors of nodes with ``role`` that the bootstrap nodes know.

        A non-member client may look up only entry points (gateway and web
        nodes); other roles are found only among the bootstrap nodes
        themselves. Results are reused for 30 s.
        """
        if role not in ROLES:
            raise InvalidParams(f"role must be one of {', '.join(ROLES)}", data={"field": "role"})
        cached = self._found.get(role)
        if cached is not None and trio.current_time() - cached[0] < DISCOVERY_REFRESH:
            return cached[1]
        from ..discovery import Descriptor

        entry = await self.entry_points()
        found: dict[str, Descriptor] = {p: d for p, d in entry.items()
                                        if role in d.roles and self._trusted(d, role)}
        for peer in list(entry):
            try:
                with trio.fail_after(BOOTSTRAP_TIMEOUT):
                    raws = await self.rpc.call(peer, "findPeers", {"role": role})
            except NotMember:
                continue  # this role is for network members to look up
            except (P2PInferError, trio.TooSlowError):
                continue
            for raw in raws if isinstance(raws, list) else []:
                try:
                    desc = Descriptor.from_wire(raw)
                except P2PInferError:
                    continue
                if (role in desc.roles and desc.peer_id not in found
                        and self._trusted(desc, role)):
                    self._remember(desc)
                    found[desc.peer_id] = desc
        result = sorted(found.values(), key=lambda d: d.peer_id)
        self._found[role] = (trio.current_time(), result)
        return result

    async def gateways(self) -> list[str]:
        """Peer ids of reachable gateways (refreshed every 30 s)."""
        gateways = [d.peer_id for d in await self.find("gateway")]
        if not gateways and self.untrusted:
            raise UntrustedPeer(
                "no gateway with a valid certificate of network "
                f"{self.network}: " + "; ".join(sorted(self.untrusted.values()))[:1000],
                data={"untrusted": sorted(self.untrusted)})
        if not gateways:
            raise NoWorkerAvailable("no gateway reachable through the bootstrap nodes",
                                    data={"retry_after": 2.0})
        return gateways

    async def peers(self) -> list[dict[str, Any]]:
        """Every node the client can see (for a non-member: the bootstrap
        nodes, gateways and web nodes), as ``{peer_id, roles, addrs, version,
        models, info}`` dicts."""
        seen: dict[str, Descriptor] = dict(await self.entry_points())
        for role in ROLES:
            for desc in await self.find(role):
                seen.setdefault(desc.peer_id, desc)
        return [{"peer_id": d.peer_id, "roles": list(d.roles), "addrs": list(d.addrs),
                 "version": d.version, "models": d.models(), "info": d.info}
                for d in sorted(seen.values(), key=lambda d: d.peer_id)]

    def _remember(self, desc: Descriptor) -> None:
        from libp2p.peer.id import ID

        from ..rpc.host import parse_multiaddr

        try:
            addrs = [parse_multiaddr(a).decapsulate(parse_multiaddr(f"/p2p/{desc.peer_id}"))
                     for a in desc.addrs]
            self._host.get_peerstore().add_addrs(ID.from_base58(desc.peer_id), addrs, 600)
        except Exception:  # an address we cannot parse is simply not dialled
            return

    def _forget(self) -> None:
        self._found.clear()

    # -- calls ------------------------------------------------------------------------------
    async def _call_role(self, role: str, method: str, params: Any) -> Any:
        """Call ``method`` on a node with ``role``, failing over between them."""
        nodes = [d.peer_id for d in await self.find(role)]
        if not nodes:
            if role == "gateway":
                await self.gateways()  # raises NoWorkerAvailable
            raise PeerUnavailable(
                f"no {role} node is reachable through the bootstrap nodes; bootstrap to a "
                f"node with the {role} role, or use a web node's URL (base_url=)")
        random.shuffle(nodes)
        last: P2PInferError | None = None
        for peer in nodes:
            try:
                return await self.rpc.call(peer, method, params)
            except (PeerUnavailable, StreamBroken) as exc:
                last = exc
                self._forget()
        assert last is not None
        raise last

    async def call(self, op: str, params: dict[str, Any],
                   credential: Credential | None) -> Any:
        """Call the RPC method of ``op`` (see :data:`ROUTES`) on a node with
        its role.

        Raises:
            UnknownMethod: an operation this transport does not know.
            PeerUnavailable: no node with the role is reachable.
        """
        route = ROUTES.get(op)
        if route is None:
            raise UnknownMethod(f"the libp2p transport has no operation {op!r}")
        return await self._call_role(route.role, route.method,
                                     route.params(params, credential))

    async def open_answer(self, request: dict[str, Any],
                          credential: Credential) -> AnswerStream:
        """Stream ``processInferenceRequest`` from a gateway, failing over to
        another if one cannot be reached."""
        self._need_open()
        gateways = list(await self.gateways())
        random.shuffle(gateways)
        last: P2PInferError | None = None
        for peer in gateways:
            stream = self.rpc.stream(peer, "processInferenceRequest",
                                     {"request": request, "auth": credential.rpc()})
            try:
                await stream.__aenter__()
                return RpcAnswer(stream)
            except (PeerUnavailable, StreamBroken) as exc:
                last = exc
                self._forget()
        assert last is not None
        raise last
