"""A :class:`~p2pinfer.context.RoleContext` without a node, for running a
role on its own: in tests, in benchmarks that time a role without the
swarm around it, and in applications that embed one role.

::

    from p2pinfer.testing import FakeContext
    from p2pinfer.inference import InferenceRole

    context = FakeContext(NodeConfig.from_mapping({"models": [...]}, env={}))
    role = InferenceRole(context)

A :class:`FakeContext` has a real identity, configuration and Prometheus
registry; the ledger, the RPC client and discovery are whatever the caller
hands in (a role that reaches for one it was not given gets a
``LookupError`` naming it), and the authenticator is built on that ledger
when first asked for; the node-wide metrics are recorded in
:class:`RecordedMetrics`; what a role asks of the node (methods to serve,
disconnect listeners, descriptor invalidations) is kept for the caller to
look at.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry

from .config import NodeConfig
from .grants import ALL_GRANTS, ROLES
from .identity import Identity

if TYPE_CHECKING:
    from .context import Role
    from .credentials import Authenticator
    from .discovery import Discovery
    from .ledger import Ledger
    from .rpc import RpcClient

__all__ = ["FakeContext", "RecordedMetrics"]

T = TypeVar("T")


class RecordedMetrics:
    """Node-wide metrics that remember each call as ``(name, args)``
    (:class:`~p2pinfer.context.Metrics`)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        #: what :meth:`health` reports as the node's problems
        self.problems: list[dict[str, str]] = []

    def count_request(self, service: str, method: str, status: str, n: int = 1) -> None:
        self.calls.append(("count_request", {"service": service, "method": method,
                                             "status": status, "n": n}))

    def observe_request(self, *, service: str, model: str, seconds: float,
                        tokens: int = 0, user_id: str | None = None) -> None:
        self.calls.append(("observe_request", {"service": service, "model": model,
                                               "seconds": seconds, "tokens": tokens,
                                               "user_id": user_id}))

    def touch_user(self, user_id: str) -> None:
        self.calls.append(("touch_user", {"user_id": user_id}))

    def rate_limit_violation(self, user_id: str, api_key_id: str | None = None) -> None:
        self.calls.append(("rate_limit_violation",
                           {"user_id": user_id, "api_key_id": api_key_id}))

    def refused(self, layer: str, reason: str) -> None:
        self.calls.append(("refused", {"layer": layer, "reason": reason}))

    def health(self) -> dict[str, Any]:
        return {"status": "degraded" if self.problems else "ok",
                "problems": list(self.problems)}

    def ledger_health(self) -> dict[str, Any] | None:
        return None

    def named(self, name: str) -> list[dict[str, Any]]:
        """The arguments of every call of ``name``, oldest first."""
        return [args for called, args in self.calls if called == name]


class FakeContext:
    """A node as its roles see it, with no host and no network (see the
    module docstring).

    Args:
        config: the node's configuration (default: every default, no
            environment).
        identity: the node key (default: a fresh one).
        ledger, rpc, discovery: what the role under test may use.
        members: peer ids that count as network members (and as nodes with
            every role's grant); the context's own peer id always does.
        roles: sibling roles :meth:`local_role` returns, by name.
        peers: what :meth:`connected_peers` returns.
        network_id: the network's id.
    """

    def __init__(self, config: NodeConfig | None = None, *,
                 identity: Identity | None = None, ledger: Ledger | None = None,
                 rpc: RpcClient | None = None, discovery: Discovery | None = None,
                 members: Iterable[str] = (), roles: dict[str, Role] | None = None,
                 peers: Iterable[str] = (), network_id: str = "p2p-fake") -> None:
        self._config = config or NodeConfig.from_mapping({}, env={})
        self._identity = identity or Identity.generate()
        self._registry = CollectorRegistry()
        self._started_at = time.time()
        self._network_id = network_id
        self._ledger, self._rpc, self._discovery = ledger, rpc, discovery
        self._authenticator: Authenticator | None = None
        self.members = set(members)
        self.roles = dict(roles or {})
        self.peers = list(peers)
        self.recorded = RecordedMetrics()
        #: what the role asked the node to serve, and to call on disconnects
        self.served: list[object] = []
        self.disconnect_listeners: list[Callable[[str], None]] = []
        #: how many times the role asked for its descriptor to be re-signed
        self.invalidated = 0

    @property
    def peer_id(self) -> str:
        return self._identity.peer_id

    @property
    def identity(self) -> Identity:
        return self._identity

    @property
    def config(self) -> NodeConfig:
        return self._config

    @property
    def registry(self) -> CollectorRegistry:
        return self._registry

    @property
    def started_at(self) -> float:
        return self._started_at

    @property
    def network_id(self) -> str:
        return self._network_id

    @property
    def ledger(self) -> Ledger:
        return _given(self._ledger, "ledger")

    @property
    def authenticator(self) -> Authenticator:
        if self._authenticator is None:
            from .credentials import Authenticator

            self._authenticator = Authenticator(self)
        return self._authenticator

    @property
    def rpc(self) -> RpcClient:
        return _given(self._rpc, "rpc")

    @property
    def discovery(self) -> Discovery:
        return _given(self._discovery, "discovery")

    @property
    def metrics(self) -> RecordedMetrics:
        return self.recorded

    @property
    def role_names(self) -> frozenset[str]:
        return frozenset(self.roles)

    def local_role(self, name: str) -> Role | None:
        return self.roles.get(name)

    def is_member(self, peer_id: str) -> bool:
        return peer_id == self.peer_id or peer_id in self.members

    def is_node(self, peer_id: str) -> bool:
        return self.is_member(peer_id)

    def grants_of(self, peer_id: str) -> frozenset[str]:
        if peer_id == self.peer_id:
            return ALL_GRANTS
        return frozenset(ROLES) if peer_id in self.members else frozenset()

    def connected_peers(self) -> list[str]:
        return list(self.peers)

    def serve(self, handler: object) -> None:
        self.served.append(handler)

    def on_disconnect(self, listener: Callable[[str], None]) -> None:
        self.disconnect_listeners.append(listener)

    def invalidate_descriptor(self) -> None:
        self.invalidated += 1

    async def serve_local(self, path: Path, *, task_status: Any = None) -> None:
        raise LookupError("a FakeContext has no RPC server to serve on a local socket")


def _given(value: T | None, name: str) -> T:
    if value is None:
        raise LookupError(f"this FakeContext was given no {name} (FakeContext({name}=...))")
    return value


if TYPE_CHECKING:
    from .context import RoleContext

    _implements: type[RoleContext] = FakeContext
