"""A secure py-libp2p host: Noise only, yamux, one connection per peer.

py-libp2p's ``new_host()`` also accepts plaintext connections unless told
otherwise, stalls every dial by 250 ms without
``max_connections_per_peer=1``, and lets an exception escaping a stream
handler crash the whole host. :func:`make_host` fixes the first two and
:func:`guard_handler` the third.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..identity import Identity

__all__ = ["RPC_PROTOCOL", "make_host", "guard_handler", "parse_multiaddr", "peer_info"]

log = logging.getLogger(__name__)

RPC_PROTOCOL = "/p2pinfer/rpc/1.0.0"


def make_host(
    identity: Identity,
    *,
    announce_addrs: Sequence[str] = (),
    enable_mdns: bool = False,
) -> Any:
    """A host that speaks only Noise and only yamux.

    Args:
        identity: the node key; the host's peer id is ``identity.peer_id``.
        announce_addrs: addresses to advertise instead of the listen ones
            (listening on 0.0.0.0 would otherwise advertise 0.0.0.0).
        enable_mdns: LAN discovery through mDNS.
    """
    import multiaddr
    from libp2p import new_host
    from libp2p.crypto.x25519 import create_new_key_pair as x25519_keypair
    from libp2p.custom_types import TProtocol
    from libp2p.network.config import ConnectionConfig
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux

    # py-libp2p's yamux answers every read with a WINDOW_UPDATE frame unless
    # told otherwise (its only knob is this variable, read at each read).
    # Batching updates at half the window, as go-yamux does, removes a third
    # of the frames of a streamed answer (measured: 21 -> 15 ms per request
    # through client, gateway and worker in one process).
    os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")
    key_pair = identity.key_pair()
    sec_opt = {
        NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=x25519_keypair().private_key)
    }
    muxer_opt = {TProtocol(YAMUX_PROTOCOL_ID): Yamux}
    kwargs: dict[str, Any] = {}
    if announce_addrs:
        kwargs["announce_addrs"] = [multiaddr.Multiaddr(a) for a in announce_addrs]
    host = new_host(
        key_pair=key_pair,
        sec_opt=sec_opt,
        muxer_opt=muxer_opt,
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        enable_mDNS=enable_mdns,
        **kwargs,
    )
    _disable_auto_dial(host)
    return host


def _disable_auto_dial(host: Any) -> None:
    """Turn off py-libp2p's auto-connector.

    Left on, it dials up to 150 peers from the peerstore whenever the node has
    fewer connections than that, and redials peers that went away. p2pinfer
    decides itself whom to dial: bootstrap peers (with backoff) and the peers
    a call is addressed to.
    """
    connector = getattr(host.get_network(), "auto_connector", None)
    if connector is None:
        return

    async def no_auto_dial() -> None:
        return None

    connector.maybe_connect = no_auto_dial


def guard_handler(
    name: str, handler: Callable[[Any], Awaitable[None]]
) -> Callable[[Any], Awaitable[None]]:
    """Wrap a libp2p stream handler so that no exception escapes into libp2p.

    An escaping exception would take the host down (py-libp2p 0.8.1 runs
    handlers in the host's own nursery). Errors are logged and the stream is
    reset; cancellation still propagates.
    """

    async def guarded(stream: Any) -> None:
        try:
            await handler(stream)
        except Exception:
            log.exception("stream handler %s failed; resetting the stream", name)
            try:
                await stream.reset()
            except Exception:  # the stream may already be gone
                log.debug("reset after handler failure also failed", exc_info=True)

    return guarded


def parse_multiaddr(addr: str) -> Any:
    """A ``Multiaddr`` from text, as :class:`~p2pinfer.errors.InvalidParams`
    when it is not one."""
    import multiaddr

    from ..errors import InvalidParams

    try:
        return multiaddr.Multiaddr(addr)
    except Exception as exc:
        raise InvalidParams(f"not a multiaddr: {addr!r} ({exc})") from exc


def peer_info(addr: str) -> Any:
    """A libp2p ``PeerInfo`` from ``/ip4/.../tcp/.../p2p/<peer id>``."""
    from libp2p.peer.peerinfo import info_from_p2p_addr

    from ..errors import InvalidParams

    try:
        return info_from_p2p_addr(parse_multiaddr(addr))
    except InvalidParams:
        raise
    except Exception as exc:
        raise InvalidParams(f"address must end in /p2p/<peer id>: {addr!r}") from exc
