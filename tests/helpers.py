"""Helpers to run real p2pinfer nodes on loopback in tests.

Nodes only see each other when they belong to one network (the ledger's
membership decides who is a member), so multi-node tests prepare their homes
with :func:`make_network` (or :func:`join_network` for a late joiner) and
start them with :func:`run_network` or :func:`run_nodes`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

ALL_ROLES = ("auth", "gateway", "inference", "metrics", "web")


def node_config(home: Path, **node: Any) -> Any:
    """A NodeConfig on loopback for tests; ``node`` keys go in the [node] table;
    other tables may be passed as ``tables={...}``."""
    from p2pinfer.config import NodeConfig

    tables = node.pop("tables", {})
    node.setdefault("listen", ["/ip4/127.0.0.1/tcp/0"])
    node.setdefault("home", str(home))
    return NodeConfig.from_mapping({"node": node, **tables}, env={})


def make_network(
    tmp_path: Path,
    n: int | Sequence[str],
    *,
    roles: Sequence[str] | Sequence[Sequence[str]] = ALL_ROLES,
) -> list[Path]:
    """Prepare the homes of ``n`` nodes (or one per name) in ONE network.

    The first home holds the network owner key (``owner.key``); every node
    gets its node key and a certificate for ``roles`` (one list for all, or
    one list per node). Returns the homes, in order.
    """
    from p2pinfer.identity import Identity
    from p2pinfer.ledger.membership import admit, create_network, save_member_cert

    names = [f"n{i}" for i in range(n)] if isinstance(n, int) else list(n)
    per_node = _roles_per_node(roles, len(names))
    homes = [tmp_path / name for name in names]
    owner = create_network(homes[0], name="test network")
    save_member_cert(homes[0], admit(owner, Identity.load_or_create(homes[0]).peer_id,
                                     per_node[0]))
    for home, node_roles in zip(homes[1:], per_node[1:], strict=True):
        join_network(homes[0], home, node_roles)
    return homes


def join_network(owner_home: Path, home: Path, roles: Sequence[str] = ALL_ROLES) -> str:
    """Admit the node of ``home`` (its key is created if needed) into the
    network owned from ``owner_home``, the way a real node joins: the owner
    signs a join token and the node imports it. Returns the new peer id."""
    from p2pinfer.identity import Identity
    from p2pinfer.ledger.membership import admit, import_join_token, load_owner, make_join_token

    owner = load_owner(owner_home)
    assert owner is not None, f"{owner_home} holds no owner key"
    peer_id = Identity.load_or_create(home).peer_id
    token = make_join_token(owner.network, admit(owner, peer_id, roles))
    import_join_token(home, token, peer_id=peer_id)
    return peer_id


def _roles_per_node(roles: Sequence[str] | Sequence[Sequence[str]], n: int) -> list[list[str]]:
    if roles and not isinstance(roles[0], str):
        out = [list(r) for r in roles]
        assert len(out) == n, "give one role list per node"
        return out
    return [list(roles) for _ in range(n)]  # type: ignore[arg-type]


@asynccontextmanager
async def run_nodes(
    nursery: trio.Nursery, configs: list[Any], **kwargs: Any
) -> AsyncIterator[list[Any]]:
    """Start one Node per config in ``nursery``; stop them all on exit."""
    from p2pinfer.node import Node

    nodes = [Node(cfg, **kwargs) for cfg in configs]
    for node in nodes:
        await nursery.start(node.run)
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@asynccontextmanager
async def run_network(
    nursery: trio.Nursery, homes: Sequence[Path], **node: Any
) -> AsyncIterator[list[Any]]:
    """Start a node per home (from :func:`make_network`): the first one, then
    the others bootstrapping to it. ``node`` keys go in the [node] table
    (roles default to none). Stops them all on exit."""
    from p2pinfer.node import Node

    node.setdefault("roles", [])
    kwargs = {k: node.pop(k) for k in ("role_factories", "registry") if k in node}
    first = Node(node_config(homes[0], **node), **kwargs)
    await nursery.start(first.run)
    nodes = [first]
    try:
        for home in homes[1:]:
            peer = Node(node_config(home, bootstrap=[first.addrs[0]], **node), **kwargs)
            await nursery.start(peer.run)
            nodes.append(peer)
        yield nodes
    finally:
        for n in nodes:
            n.stop()


async def wait_for(predicate: Callable[[], Any], *, limit: float = 10.0,
                   interval: float = 0.05) -> Any:
    """Poll an (a)sync predicate until truthy; fail the test after ``limit`` seconds."""
    with trio.fail_after(limit):
        while True:
            value = predicate()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return value
            await trio.sleep(interval)
