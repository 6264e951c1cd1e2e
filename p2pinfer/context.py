"""What a role may use of the node it runs in: :class:`RoleContext`.

A role (auth, gateway, inference, metrics, web, or one an embedding
application brings) is built with one argument, the node's
:class:`RoleContext`, and touches the node only through it: its identity
and configuration, the ledger, the RPC client and server registration,
discovery, the node-wide metrics, membership questions, and a read-only
lookup of another local role's public face (:class:`Role`). It never
reaches into a sibling role's internals, and it imports neither the node
nor another role (``tests/test_layers.py``).

:class:`p2pinfer.node.Node` implements the Protocol (mypy checks it where
the node builds its roles); tests build roles on small fakes that
implement it too (``tests/fakes.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    from prometheus_client import CollectorRegistry

    from .config import NodeConfig
    from .credentials import Authenticator
    from .discovery import Discovery
    from .identity import Identity
    from .ledger import Ledger
    from .rpc import RpcClient

__all__ = ["Metrics", "Role", "RoleContext"]


class Role(Protocol):
    """A role as its node and its sibling roles see it."""

    name: str

    async def run(self, *, task_status: Any = ...) -> None:
        """Serve until cancelled; report ``task_status.started()`` once ready."""

    def describe(self) -> dict[str, Any]:
        """The role's public state, signed into the node's descriptor."""

    def topics(self) -> list[str]:
        """Extra discovery topics to announce (besides ``role/<name>``)."""


class Metrics(Protocol):
    """The node-wide metrics and health, as roles use them
    (:class:`p2pinfer.metrics.NodeMetrics` implements it)."""

    def count_request(self, service: str, method: str, status: str, n: int = 1) -> None:
        """``n`` requests served outside RPC (e.g. over HTTP)."""

    def observe_request(self, *, service: str, model: str, seconds: float,
                        tokens: int = 0, user_id: str | None = None) -> None:
        """One finished inference request."""

    def touch_user(self, user_id: str) -> None:
        """``user_id`` was active now (the active-user windows)."""

    def rate_limit_violation(self, user_id: str, api_key_id: str | None = None) -> None:
        """A request was refused by a rate limit."""

    def refused(self, layer: str, reason: str) -> None:
        """Something was refused to a peer for want of membership or a grant."""

    def health(self) -> dict[str, Any]:
        """This node's own health: status, problems, roles, models, ledger."""

    def ledger_health(self) -> dict[str, Any] | None:
        """Events, held events, events behind and members of the ledger."""


class RoleContext(Protocol):
    """The node, as each of its roles sees it."""

    @property
    def peer_id(self) -> str:
        """This node's libp2p peer id."""

    @property
    def identity(self) -> Identity:
        """The node key (signs descriptors, ledger events, tokens)."""

    @property
    def config(self) -> NodeConfig:
        """The node's configuration; a role reads its own table from it
        (``config.section(name)``) through its settings class."""

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry of this node (never the global one)."""

    @property
    def started_at(self) -> float:
        """When the node was built (wall-clock seconds)."""

    @property
    def network_id(self) -> str:
        """The network this node is a member of."""

    @property
    def ledger(self) -> Ledger:
        """The node's replica of the signed ledger (users, keys, usage, ...)."""

    @property
    def authenticator(self) -> Authenticator:
        """Checks credentials on the ledger; one per node, so that every
        role of the node throttles a guessing client with the same counts."""

    @property
    def rpc(self) -> RpcClient:
        """Calls and streams to other nodes (and to this one, in-process)."""

    @property
    def discovery(self) -> Discovery:
        """Signed descriptors of the swarm's nodes, by role and by model."""

    @property
    def metrics(self) -> Metrics:
        """The node-wide metrics."""

    @property
    def role_names(self) -> frozenset[str]:
        """The roles this node runs."""

    def local_role(self, name: str) -> Role | None:
        """Another role of this node, by name, as :class:`Role` (its public
        face: ``describe()``), or None when the node does not run it."""

    def is_member(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is an admitted member of the network."""

    def is_node(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is a member whose certificate grants a node role."""

    def grants_of(self, peer_id: str) -> frozenset[str]:
        """What ``peer_id``'s certificate lets it do here."""

    def connected_peers(self) -> list[str]:
        """Peer ids this node has a connection to."""

    def serve(self, handler: object) -> None:
        """Serve the ``@rpc_method`` methods of ``handler`` on this node."""

    def on_disconnect(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(peer_id)`` once a peer's last connection closes."""

    def invalidate_descriptor(self) -> None:
        """Something a role describes changed: re-sign and re-announce."""

    async def serve_local(self, path: Path, *, task_status: Any = ...) -> None:
        """Serve the node's RPC methods on a unix socket at ``path`` (mode
        0600; its directory must be the node user's alone) until cancelled.
        A process connecting there acts as the node itself: for helper
        processes of a role (the web role's front doors)."""
