"""A secure py-libp2p host: Noise only, yamux, one connection per peer.

py-libp2p's ``new_host()`` also accepts plaintext connections unless told
otherwise, stalls every dial by 250 ms without
``max_connections_per_peer=1``, and lets an exception escaping a stream
handler crash the whole host. :func:`make_host` fixes the first two and
:func:`guard_handler` the third.

:func:`make_host` also hardens the TCP transport (see :func:`harden_tcp`):

- at most ``max_inbound_per_ip`` inbound connections from one IP address
  (``[node] max_inbound_per_ip``, 64 by default).
  py-libp2p accepts 250 inbound connections in all and holds each slot
  while the handshake runs (up to 10 s) or for the connection's life: one
  client opening 300 idle TCP connections otherwise locks everyone out;
- connections still in their handshake (nothing proven yet) are bounded
  too: :data:`PENDING_PER_IP` per address and :data:`PENDING_TOTAL` in all;
  past the total, the oldest pending handshake is closed to make room, so
  idle connections from many addresses cannot keep a new client (or a
  member) from being heard;
- a slot is given back when its connection closes. py-libp2p 0.8.1's
  inbound handler never returns (it waits for the whole swarm to stop, to
  "keep the handler alive"), so without this every inbound connection
  ever made held its slot for good: 64 CLI runs from one machine locked
  that machine out of the node, and 250 connections in all locked out
  everyone;
- every TCP socket gets keepalive and ``TCP_USER_TIMEOUT``: a peer whose
  link silently drops packets (a cut cable, a partition) is declared gone
  within about ``dead_link_timeout`` seconds (``[node] dead_link_timeout``,
  :data:`TCP_DEAD_AFTER` by default) instead of the ~15 minutes of TCP
  retransmissions, so its calls fail over instead of hanging. Shorter fails
  over sooner; too short cuts healthy peers on a congested link.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from ..identity import Identity

__all__ = ["RPC_PROTOCOL", "make_host", "guard_handler", "harden_tcp", "parse_multiaddr",
           "peer_info"]

log = logging.getLogger(__name__)

RPC_PROTOCOL = "/p2pinfer/rpc/1.0.0"
DEFAULT_MAX_INBOUND_PER_IP = 64
PENDING_PER_IP = 8
PENDING_TOTAL = 64
# Seconds after which unacknowledged data (or unanswered keepalive probes)
# mean the peer is gone.
TCP_DEAD_AFTER = 15


def make_host(
    identity: Identity,
    *,
    announce_addrs: Sequence[str] = (),
    enable_mdns: bool = False,
    max_inbound_per_ip: int = DEFAULT_MAX_INBOUND_PER_IP,
    dead_link_timeout: float = TCP_DEAD_AFTER,
    on_dial: Callable[[bool], None] | None = None,
) -> Any:
    """A host that speaks only Noise and only yamux.

    Args:
        identity: the node key; the host's peer id is ``identity.peer_id``.
        announce_addrs: addresses to advertise instead of those
            :func:`p2pinfer.addresses.advertised` picks from the listen
            addresses (wildcards expanded, loopback dropped if there is more).
        enable_mdns: LAN discovery through mDNS.
        max_inbound_per_ip: inbound connections accepted from one IP address.
        dead_link_timeout: seconds of unacknowledged data (or unanswered
            keepalives) after which a TCP connection is given up.
        on_dial: told whether each outgoing TCP connection attempt connected.
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
    built: list[Any] = []
    if announce_addrs:
        kwargs["announce_addrs"] = [multiaddr.Multiaddr(a) for a in announce_addrs]
    else:
        from ..addresses import advertised

        def addrs_factory(candidates: list[Any]) -> list[Any]:
            listening = built[0].get_transport_addrs() if built else candidates
            return advertised(candidates, listening)

        kwargs["addrs_factory"] = addrs_factory
    host = new_host(
        key_pair=key_pair,
        sec_opt=sec_opt,
        muxer_opt=muxer_opt,
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        enable_mDNS=enable_mdns,
        **kwargs,
    )
    built.append(host)
    _disable_auto_dial(host)
    _shorten_dial_blacklist(host)
    harden_tcp(host, max_inbound_per_ip=max_inbound_per_ip, dead_after=dead_link_timeout,
               on_dial=on_dial)
    return host


def _tcp_socket(conn: Any) -> Any:
    """The socket under a py-libp2p raw connection (RawConnection ->
    TrioTCPStream -> trio.SocketStream -> socket), or None."""
    obj = conn
    for _ in range(4):
        sock = getattr(obj, "socket", None)
        if sock is not None and hasattr(sock, "setsockopt"):
            return sock
        obj = getattr(obj, "stream", None)
        if obj is None:
            return None
    return None


def local_ip(conn: Any) -> str | None:
    """The local IP address of a py-libp2p connection at any layer (swarm,
    muxed, secured or raw), or None if there is no TCP socket under it."""
    seen: set[int] = set()
    layer = [conn]
    for _ in range(8):
        below: list[Any] = []
        for obj in layer:
            if obj is None or id(obj) in seen:
                continue
            seen.add(id(obj))
            sock = getattr(obj, "socket", None)
            if sock is not None and hasattr(sock, "getsockname"):
                try:
                    return str(sock.getsockname()[0])
                except OSError:
                    return None
            below.extend(getattr(obj, name, None) for name in
                         ("muxed_conn", "secured_conn", "conn", "stream", "raw_conn"))
        layer = below
    return None


def liveness_options(dead_after: float) -> list[tuple[int, int, int]]:
    """The socket options that give up on a silent peer after about
    ``dead_after`` seconds: keepalive probes from a third of it on, and
    ``TCP_USER_TIMEOUT`` for data left unacknowledged."""
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    idle = max(1, int(dead_after // 3))
    interval = max(1, min(2, int(dead_after // 6)))
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval),
                        ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", int(dead_after * 1000))):
        if hasattr(socket, name):  # Linux; elsewhere keepalive defaults apply
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return options


def _watch_liveness(conn: Any, dead_after: float) -> None:
    sock = _tcp_socket(conn)
    if sock is None:
        return
    for level, option, value in liveness_options(dead_after):
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            log.debug("setsockopt(%s) failed", option, exc_info=True)


def _remote_ip(conn: Any) -> str | None:
    try:
        address = conn.get_remote_address()
    except Exception:
        return None
    return str(address[0]) if address else None


class _Inbound:
    """One inbound connection, from accept to close."""

    __slots__ = ("ip", "conn", "muxed", "settled", "born")

    def __init__(self, ip: str | None, conn: Any) -> None:
        self.ip = ip
        self.conn = conn
        self.muxed: Any = None          # once the handshake is done
        self.settled = trio.Event()     # handshake done, or the handler ended
        self.born = trio.current_time()


_current_inbound: contextvars.ContextVar[_Inbound | None] = contextvars.ContextVar(
    "p2pinfer_inbound", default=None)


def harden_tcp(host: Any, *, max_inbound_per_ip: int,
               dead_after: float = TCP_DEAD_AFTER,
               on_dial: Callable[[bool], None] | None = None) -> None:
    """Per-IP and pending-handshake inbound limits, slots given back on
    close, and liveness on every TCP connection of ``host`` (see the module
    docstring). Wraps three py-libp2p 0.8.1 entry points: the swarm's
    inbound connection handler and upgrade, and each transport's dial
    (``on_dial`` is told whether each outgoing attempt connected)."""
    swarm = host.get_network()
    inbound = getattr(swarm, "_handle_inbound_connection", None)
    upgrade = getattr(swarm, "upgrade_inbound_raw_conn", None)
    if inbound is not None and upgrade is not None:
        per_ip: dict[str, int] = {}
        pending: list[_Inbound] = []  # oldest first
        warned: set[str] = set()  # one warning per flood, not one per connection

        async def upgrade_noted(raw_conn: Any, maddr: Any) -> Any:
            muxed = await upgrade(raw_conn, maddr)
            me = _current_inbound.get()
            if me is not None:
                me.muxed = muxed
                me.settled.set()
            return muxed

        async def close_quietly(conn: Any) -> None:
            try:
                await conn.close()
            except Exception:
                log.debug("closing a refused connection failed", exc_info=True)

        def refuse(ip: str | None, why: str) -> None:
            if ip is not None and ip not in warned:
                warned.add(ip)
                log.warning("refusing inbound connections from %s: %s", ip, why)

        async def limited(read_write_closer: Any, maddr: Any) -> None:
            ip = _remote_ip(read_write_closer)
            if ip is not None and per_ip.get(ip, 0) >= max_inbound_per_ip:
                refuse(ip, f"{max_inbound_per_ip} already open")
                await close_quietly(read_write_closer)
                return
            if ip is not None and sum(1 for p in pending if p.ip == ip) >= PENDING_PER_IP:
                refuse(ip, f"{PENDING_PER_IP} handshakes already pending")
                await close_quietly(read_write_closer)
                return
            if len(pending) >= PENDING_TOTAL:  # make room: the oldest handshake goes
                oldest = pending.pop(0)
                oldest.settled.set()
                await close_quietly(oldest.conn)
            me = _Inbound(ip, read_write_closer)
            pending.append(me)
            if ip is not None:
                per_ip[ip] = per_ip.get(ip, 0) + 1
            try:
                _watch_liveness(read_write_closer, dead_after)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_handle, inbound, read_write_closer, maddr, me)
                    await me.settled.wait()
                    if me in pending:
                        pending.remove(me)
                    if me.muxed is not None:
                        await me.muxed.event_closed.wait()
                    # closed (or never upgraded): end py-libp2p's handler,
                    # which would otherwise wait for the whole swarm
                    nursery.cancel_scope.cancel()
            finally:
                if me in pending:
                    pending.remove(me)
                if ip is not None:
                    left = per_ip[ip] - 1
                    if left:
                        per_ip[ip] = left
                    else:
                        del per_ip[ip]
                    if left < max_inbound_per_ip // 2:
                        warned.discard(ip)

        swarm._handle_inbound_connection = limited
        swarm.upgrade_inbound_raw_conn = upgrade_noted
    manager = getattr(swarm, "transport_manager", None)
    for transport in (manager.get_transports() if manager is not None else []):
        for name in ("dial", "dial_with_source"):
            original = getattr(transport, name, None)
            if original is None:
                continue

            async def dial(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                try:
                    conn = await _original(*args, **kwargs)
                except BaseException:
                    if on_dial is not None:
                        on_dial(False)
                    raise
                if on_dial is not None:
                    on_dial(True)
                _watch_liveness(conn, dead_after)
                return conn

            setattr(transport, name, dial)


async def _handle(inbound: Any, conn: Any, maddr: Any, me: _Inbound) -> None:
    token = _current_inbound.set(me)
    try:
        await inbound(conn, maddr)
    finally:
        _current_inbound.reset(token)
        me.settled.set()


# Seconds a peer whose every address failed is refused without dialing.
NEGATIVE_DIAL_TTL = 1.0


def _shorten_dial_blacklist(host: Any) -> None:
    """Forget failed dials after :data:`NEGATIVE_DIAL_TTL` instead of 60 s.

    py-libp2p 0.8.1 refuses to dial a peer for 60 s after all its addresses
    failed once, even when asked explicitly. A node that restarts is then
    unreachable for a minute by everyone who tried it while it was down:
    clients cannot reconnect to their gateway, and a gateway keeps treating a
    restarted quota coordinator as dead (two coordinators for its users).
    p2pinfer paces its own retries (router and coordinator cooldowns,
    bootstrap backoff), so a short blacklist only absorbs bursts.
    """
    cache = getattr(host.get_network(), "_negative_peer_cache", None)
    if cache is not None and hasattr(cache, "_ttl"):
        cache._ttl = NEGATIVE_DIAL_TTL


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
