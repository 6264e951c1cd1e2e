"""Several nodes on one machine: the quick start, examples and benchmarks.

:func:`prepare_local_network` makes one network for a set of node homes under
a base directory (the first node holds the owner key and admits the
others). It is idempotent: run it again and it reuses the same keys, network
and data, admitting only nodes it has not admitted yet.

:class:`LocalSwarm` runs those nodes in this process, the first one as the
bootstrap of the others::

    layout = {"hub": ["auth", "gateway", "web", "metrics"], "worker-1": ["inference"]}
    async with LocalSwarm(Path("~/.config/p2pinfer/up").expanduser(), layout) as swarm:
        print(swarm.nodes["hub"].addrs[0])
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from .config import NodeConfig
from .errors import ConfigError
from .identity import Identity

__all__ = ["LocalSwarm", "prepare_local_network"]

log = logging.getLogger(__name__)


def prepare_local_network(
    base: Path, layout: Mapping[str, Sequence[str]], *, name: str = "local swarm"
) -> dict[str, Path]:
    """Homes ``base/<node name>`` for every node of ``layout`` (name → roles),
    all members of one network owned by the first node's home.

    Raises:
        ConfigError: a home belongs to another network, or holds a
            certificate that lacks a role the layout asks for.
    """
    from .ledger.membership import (
        admit,
        create_network,
        import_join_token,
        load_network,
        load_owner,
        make_join_token,
        save_member_cert,
    )

    if not layout:
        raise ConfigError("a swarm needs at least one node")
    names = list(layout)
    homes = {n: base / n for n in names}
    first = homes[names[0]]
    owner = load_owner(first)
    if owner is None:
        if load_network(first) is not None:
            raise ConfigError(f"{first} belongs to a network whose owner key is elsewhere")
        owner = create_network(first, name=name)
        log.info("created network %s in %s", owner.network.network_id, first)
    for node_name in names:
        home = homes[node_name]
        roles = list(layout[node_name])
        peer_id = Identity.load_or_create(home).peer_id
        existing = load_network(home)
        if existing is not None and existing.network_id != owner.network.network_id:
            raise ConfigError(f"{home} belongs to network {existing.network_id}, "
                              f"not {owner.network.network_id}")
        if _has_cert_for(home, roles):
            continue
        cert = admit(owner, peer_id, roles)
        if home == first:
            save_member_cert(home, cert)
        else:
            import_join_token(home, make_join_token(owner.network, cert), peer_id=peer_id)
    return homes


def _has_cert_for(home: Path, roles: Sequence[str]) -> bool:
    """Whether ``home`` holds a certificate granting ``roles`` for another day."""
    import time

    from .ledger.membership import load_member_cert

    cert = load_member_cert(home)
    if cert is None:
        return False
    granted = set(cert.doc.get("roles", ()))
    return set(roles) <= granted and float(cert.doc.get("exp", 0)) > time.time() + 86400


class LocalSwarm:
    """Runs the nodes of :func:`prepare_local_network` in this process.

    Args:
        base: the directory holding one home per node.
        layout: node name → roles; the first node is everyone's bootstrap.
        tables: extra config tables for every node (``{"gateway": {...}}``),
            or per node under the node's name (``{"worker-1": {"inference": ...}}``).
        listen: the first node's listen address (the others pick free ports).
    """

    def __init__(
        self,
        base: Path,
        layout: Mapping[str, Sequence[str]],
        *,
        tables: Mapping[str, Any] | None = None,
        listen: str = "/ip4/127.0.0.1/tcp/0",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.base = base
        self.layout = dict(layout)
        self.tables = dict(tables or {})
        self.listen = listen
        self.env = env
        self.homes = prepare_local_network(base, layout)
        self.nodes: dict[str, Any] = {}
        self._nursery_cm: Any = None

    def config(self, name: str, bootstrap: Sequence[str]) -> NodeConfig:
        shared = {k: v for k, v in self.tables.items() if k not in self.layout}
        own = self.tables.get(name, {})
        data: dict[str, Any] = {**shared, **own}
        node = dict(data.pop("node", {}))
        node.setdefault("home", str(self.homes[name]))
        node.setdefault("roles", list(self.layout[name]))
        node.setdefault("listen", [self.listen if not bootstrap else "/ip4/127.0.0.1/tcp/0"])
        node.setdefault("bootstrap", list(bootstrap))
        node.setdefault("database_url", f"sqlite:///{self.homes[name] / 'node.db'}")
        return NodeConfig.from_mapping({**data, "node": node},
                                       env=self.env if self.env is not None else {})

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start every node (the first one first) and run until cancelled."""
        from .node import Node

        async with trio.open_nursery() as nursery:
            bootstrap: list[str] = []
            for name in self.layout:
                node = Node(self.config(name, bootstrap))
                await nursery.start(node.run)
                self.nodes[name] = node
                if not bootstrap:
                    bootstrap = [node.addrs[0]]
            task_status.started(self)

    async def __aenter__(self) -> LocalSwarm:
        self._nursery_cm = trio.open_nursery()
        nursery = await self._nursery_cm.__aenter__()
        try:
            await nursery.start(self.run)
        except BaseException as exc:
            nursery.cancel_scope.cancel()
            await self._nursery_cm.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._cancel = nursery.cancel_scope
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        self._cancel.cancel()
        return await self._nursery_cm.__aexit__(*exc)

    @property
    def first(self) -> Any:
        return self.nodes[next(iter(self.layout))]
