"""Which of a node's addresses other machines can use.

A node that listens on a wildcard (``/ip4/0.0.0.0/tcp/4001``) is reachable
on every address of every interface, and py-libp2p would advertise the
wildcard itself, or (through its interface helper) loopback addresses, and
``::1`` even for an IPv4-only listener. Another machine that dials
``127.0.0.1:4001`` reaches *itself*: the Noise handshake then fails, and
a gateway never reaches the workers of other machines.

:func:`advertised` is the host's address factory (py-libp2p calls it each
time it reports its addresses: identify, descriptors, join tokens):

- a wildcard listener becomes the addresses its interfaces have *now*
  (so a changed IP address is advertised at once);
- loopback and link-local addresses are dropped whenever the node has any
  other address: they are only advertised by a node that has nothing else
  (every node of a one-machine swarm on 127.0.0.1);
- addresses others observed us at (identify) are kept only on a port we
  listen on (an outgoing connection's port cannot be dialled).

``[node] announce`` replaces all of this with a fixed list.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["advertised", "check_ports_free", "interface_ips", "is_local", "host_port"]

log = logging.getLogger(__name__)

WILDCARDS = {"0.0.0.0", "::"}


def interface_ips(version: int) -> list[str]:
    """The IP addresses (4 or 6) of this machine's interfaces, now."""
    import psutil

    family = socket.AF_INET if version == 4 else socket.AF_INET6
    out: list[str] = []
    try:
        interfaces = psutil.net_if_addrs()
    except OSError:  # pragma: no cover - /proc unreadable
        log.debug("listing interfaces failed", exc_info=True)
        return out
    for entries in interfaces.values():
        for entry in entries:
            if entry.family == family:
                ip = entry.address.split("%", 1)[0]  # fe80::1%eth0
                if ip not in out:
                    out.append(ip)
    return out


def is_local(ip: str) -> bool:
    """Loopback or link-local: useless to another machine."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return address.is_loopback or address.is_link_local


def host_port(addr: Any) -> tuple[str, str, int] | None:
    """``("ip4"|"ip6", ip, tcp port)`` of a TCP multiaddr, else None."""
    text = str(addr)
    parts = text.split("/")
    if len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        return None
    try:
        return parts[1], parts[2], int(parts[4])
    except ValueError:
        return None


def _expand(addrs: Iterable[Any]) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    for addr in addrs:
        hp = host_port(addr)
        if hp is None:
            continue
        proto, ip, port = hp
        if ip in WILDCARDS:
            for iface_ip in interface_ips(4 if proto == "ip4" else 6):
                out.append((proto, iface_ip, port))
        else:
            out.append(hp)
    return out


def advertised(candidates: Sequence[Any], listening: Sequence[Any] | None = None) -> list[Any]:
    """The addresses to tell peers, from py-libp2p's candidates (listen
    addresses first, then observed ones); see the module docstring.

    Args:
        candidates: multiaddrs (listen addresses, then observed ones).
        listening: the listen addresses (default: every candidate).
    """
    import multiaddr

    ports = {hp[2] for hp in _expand(listening if listening is not None else candidates)}
    seen: set[tuple[str, str, int]] = set()
    chosen: list[tuple[str, str, int]] = []
    for hp in _expand(candidates):
        if hp in seen or hp[2] not in ports:
            continue
        seen.add(hp)
        chosen.append(hp)
    remote = [hp for hp in chosen if not is_local(hp[1])]
    final = remote or chosen
    return [multiaddr.Multiaddr(f"/{proto}/{ip}/tcp/{port}") for proto, ip, port in final]


def check_ports_free(listen: Iterable[Any]) -> None:
    """Raise ConfigError naming the first TCP listen address (with a fixed
    port) that another socket holds.

    py-libp2p listens with ``SO_REUSEPORT``, so a second node on a busy
    port would start "successfully" and the kernel would split incoming
    connections between the two. A probe bound without ``SO_REUSEPORT``
    fails on a port held by anybody, ``SO_REUSEPORT`` or not (``SO_REUSEADDR``
    keeps connections in TIME_WAIT from a previous run from counting).
    """
    from .errors import ConfigError

    for addr in listen:
        hp = host_port(addr)
        if hp is None or hp[2] == 0:
            continue
        proto, ip, port = hp
        family = socket.AF_INET if proto == "ip4" else socket.AF_INET6
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((ip, port))
            except OSError as exc:
                raise ConfigError(
                    f"node.listen: {addr} cannot be used: port {port} is already in use "
                    f"({exc.strerror or exc}); is another node or program listening there? "
                    "Choose another port with --listen or [node] listen.",
                    data={"field": "node.listen", "port": port}) from None
