"""What a node advertises (p2pinfer.addresses), and that a node with no
other address still works on loopback."""

from __future__ import annotations

import socket
from typing import Any

import multiaddr
import pytest

from p2pinfer import addresses
from p2pinfer.errors import ConfigError


def ma(*texts: str) -> list[multiaddr.Multiaddr]:
    return [multiaddr.Multiaddr(t) for t in texts]


@pytest.fixture
def interfaces(monkeypatch: pytest.MonkeyPatch) -> dict[int, list[str]]:
    table = {4: ["127.0.0.1", "10.1.2.3", "169.254.9.9"], 6: ["::1", "fe80::1", "2001:db8::5"]}
    monkeypatch.setattr(addresses, "interface_ips", lambda version: table[version])
    return table


def test_a_wildcard_becomes_the_machines_addresses_without_loopback(
        interfaces: dict[int, list[str]]) -> None:
    out = addresses.advertised(ma("/ip4/0.0.0.0/tcp/4001"))
    assert [str(a) for a in out] == ["/ip4/10.1.2.3/tcp/4001"]
    both = addresses.advertised(ma("/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001"))
    assert [str(a) for a in both] == ["/ip4/10.1.2.3/tcp/4001", "/ip6/2001:db8::5/tcp/4001"]


def test_an_ipv4_listener_never_advertises_ipv6(interfaces: dict[int, list[str]]) -> None:
    # py-libp2p's interface helper added /ip6/::1 to an IPv4-only wildcard
    assert not any("/ip6/" in str(a) for a in addresses.advertised(ma("/ip4/0.0.0.0/tcp/9")))


def test_loopback_only_when_there_is_nothing_else(interfaces: dict[int, list[str]]) -> None:
    interfaces[4][:] = ["127.0.0.1"]
    assert [str(a) for a in addresses.advertised(ma("/ip4/0.0.0.0/tcp/4001"))] == [
        "/ip4/127.0.0.1/tcp/4001"]
    assert [str(a) for a in addresses.advertised(ma("/ip4/127.0.0.1/tcp/5"))] == [
        "/ip4/127.0.0.1/tcp/5"]


def test_an_observed_address_counts_only_on_a_listen_port(
        interfaces: dict[int, list[str]]) -> None:
    listen = ma("/ip4/10.1.2.3/tcp/4001")
    candidates = listen + ma("/ip4/203.0.113.7/tcp/4001", "/ip4/203.0.113.7/tcp/51234")
    out = addresses.advertised(candidates, listen)
    assert [str(a) for a in out] == ["/ip4/10.1.2.3/tcp/4001", "/ip4/203.0.113.7/tcp/4001"]


def test_a_busy_port_is_named() -> None:
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as py-libp2p does
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError) as ei:
            addresses.check_ports_free(ma(f"/ip4/127.0.0.1/tcp/{port}"))
        assert f"port {port} is already in use" in ei.value.message
        assert ei.value.data == {"field": "node.listen", "port": port}
    addresses.check_ports_free(ma(f"/ip4/127.0.0.1/tcp/{port}", "/ip4/127.0.0.1/tcp/0"))


async def test_announce_replaces_what_a_node_advertises(tmp_path: Any,
                                                        nursery: Any) -> None:
    """``[node] announce`` (a forwarded public address behind NAT) is all a
    node advertises: in its descriptor, to identify, and in daemon.json."""
    from p2pinfer.node import Node

    from .helpers import make_network, node_config

    (home,) = make_network(tmp_path, 1, roles=["gateway"])
    cfg = node_config(home, roles=["gateway"], listen=["/ip4/0.0.0.0/tcp/0"],
                      announce=["/ip4/203.0.113.7/tcp/4001"])
    node = Node(cfg)
    await nursery.start(node.run)
    try:
        expected = [f"/ip4/203.0.113.7/tcp/4001/p2p/{node.peer_id}"]
        assert node.addrs == expected
        assert list(node.descriptor().addrs) == expected
        assert [str(a) for a in node.host.get_addrs()] == expected
    finally:
        node.stop()
