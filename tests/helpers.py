"""Helpers to run real p2pinfer nodes on loopback in tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio


def node_config(home: Path, **node: Any) -> Any:
    """A NodeConfig on loopback for tests; ``node`` keys go in the [node] table;
    other tables may be passed as ``tables={...}``."""
    from p2pinfer.config import NodeConfig

    tables = node.pop("tables", {})
    node.setdefault("listen", ["/ip4/127.0.0.1/tcp/0"])
    node.setdefault("home", str(home))
    return NodeConfig.from_mapping({"node": node, **tables}, env={})


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
