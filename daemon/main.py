"""Run a p2pinfer node as a long-lived process.

``p2pinfer daemon --config node.toml`` (or ``python -m p2pinfer.daemon``)
builds a :class:`~p2pinfer.config.NodeConfig` from the TOML file and the
environment, runs the node, and stops it cleanly on SIGINT or SIGTERM.

With ``--ready-file PATH`` the daemon writes ``{"peer_id": ..., "addrs": [...]}``
to PATH once it serves, so scripts and tests can bootstrap other nodes from it.
It always writes the same to ``<home>/daemon.json`` (removed when it stops),
which is how the CLI's operator commands find the node of a home.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import trio

from p2pinfer.config import NodeConfig
from p2pinfer.runtime import tune_gc

__all__ = ["run_daemon", "serve"]

log = logging.getLogger("p2pinfer.daemon")


DAEMON_FILE = "daemon.json"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


async def serve(config: NodeConfig, *, ready_file: Path | None = None,
                on_ready: Any = None) -> None:
    """Run a node until SIGINT/SIGTERM (or cancellation)."""
    from p2pinfer.node import Node

    node = Node(config)
    daemon_file = config.home / DAEMON_FILE
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            await nursery.start(node.run)
            tune_gc()
            info = {"peer_id": node.peer_id, "addrs": node.addrs, "pid": os.getpid()}
            try:
                _write_json(daemon_file, info)
                if ready_file is not None:
                    _write_json(ready_file, info)
                if on_ready is not None:
                    on_ready(node)
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    break
            finally:
                daemon_file.unlink(missing_ok=True)
            nursery.cancel_scope.cancel()


def run_daemon(config: NodeConfig, *, ready_file: Path | None = None, on_ready: Any = None) -> None:
    """Blocking entry point used by ``p2pinfer daemon``."""
    trio.run(functools.partial(serve, config, ready_file=ready_file, on_ready=on_ready))
