"""p2pinfer: peer-to-peer AI inference on machines you own.

Every machine runs a :class:`Node` holding any set of roles (auth, gateway,
inference, metrics, web); nodes find each other on a Kademlia DHT, speak
msgpack RPC over Noise-encrypted libp2p streams, and keep users, keys and
usage in a signed, replicated ledger.

The names below are the public API; everything else may change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Re-exported lazily so that `import p2pinfer` (and `p2pinfer --help`) stay
# fast: py-libp2p alone costs over a second to import.
_EXPORTS = {
    "Node": "p2pinfer.node",
    "NodeConfig": "p2pinfer.config",
    "Identity": "p2pinfer.identity",
    "P2PInferError": "p2pinfer.errors",
    "Client": "p2pinfer.client",
    "SyncClient": "p2pinfer.client",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover
    from .client import Client as Client
    from .client import SyncClient as SyncClient
    from .config import NodeConfig as NodeConfig
    from .errors import P2PInferError as P2PInferError
    from .identity import Identity as Identity
    from .node import Node as Node


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'p2pinfer' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
