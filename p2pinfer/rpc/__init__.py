"""msgpack RPC over Noise-encrypted libp2p streams.

- ``host.py``: builds the libp2p host (Noise only, yamux, one connection per
  peer) and guards every stream handler so no exception reaches libp2p.
- ``server.py``: :class:`RpcServer` dispatches requests to ``rpc_*`` methods
  of registered role objects, with access levels, deadlines, cancellation and
  credit-based backpressure on streams.
- ``client.py``: :class:`RpcClient` keeps one long-lived multiplexed stream
  per peer and offers unary :meth:`~RpcClient.call` and server-streaming
  :meth:`~RpcClient.stream`.
- ``channel.py``: the framed, batched duplex pipe both sides share.
- ``connections.py``: which of a peer's connections both sides keep, and
  how a redundant one is retired without cutting the answers on it.

The frame format itself is sans-IO and lives in :mod:`p2pinfer.wire`.
"""

from __future__ import annotations

from .client import RpcClient as RpcClient
from .client import RpcStream as RpcStream
from .host import RPC_PROTOCOL as RPC_PROTOCOL
from .host import make_host as make_host
from .server import Access as Access
from .server import CallContext as CallContext
from .server import RpcServer as RpcServer
from .server import rpc_method as rpc_method

__all__ = [
    "Access",
    "CallContext",
    "RPC_PROTOCOL",
    "RpcClient",
    "RpcServer",
    "RpcStream",
    "make_host",
    "rpc_method",
]
