"""Node-level behaviour: joining through the join token's bootstrap addresses,
self-calls, shutdown."""

from __future__ import annotations

from pathlib import Path

import trio

from p2pinfer.identity import Identity
from p2pinfer.node import Node

from .helpers import make_network, node_config, wait_for


async def test_join_token_bootstrap_is_dialled(tmp_path: Path, nursery: trio.Nursery) -> None:
    """A node that imported a join token naming bootstrap addresses joins
    through them with no bootstrap in its own config."""
    from p2pinfer.ledger.membership import admit, import_join_token, load_owner, make_join_token

    (owner_home,) = make_network(tmp_path, ["owner"], roles=["auth"])
    first = Node(node_config(owner_home, roles=[]))
    await nursery.start(first.run)
    owner = load_owner(owner_home)
    assert owner is not None
    home = tmp_path / "late"
    peer_id = Identity.load_or_create(home).peer_id
    token = make_join_token(owner.network, admit(owner, peer_id, ["inference"]),
                            bootstrap=[first.addrs[0]])
    import_join_token(home, token, peer_id=peer_id)
    late = Node(node_config(home, roles=[]))
    assert late.bootstrap_addrs() == [first.addrs[0]]
    assert first.bootstrap_addrs() == []
    with trio.fail_after(20):
        await nursery.start(late.run)
        await wait_for(lambda: first.peer_id in late.connected_peers())
        assert late.network_id == first.network_id
        pong = await late.rpc.call(first.peer_id, "ping")
        assert pong["member"] is True  # the first node learned the late one's cert
    late.stop()
    first.stop()


async def test_stop_is_prompt(tmp_path: Path, nursery: trio.Nursery) -> None:
    (home,) = make_network(tmp_path, ["n"], roles=["auth"])
    node = Node(node_config(home, roles=["auth"]))
    await nursery.start(node.run)
    assert node.host.get_network().listeners
    t0 = trio.current_time()
    node.stop()
    await wait_for(lambda: not node.host.get_network().listeners, limit=5, interval=0.01)
    assert trio.current_time() - t0 < 1.0


async def test_one_node_per_home(tmp_path: Path, nursery: trio.Nursery) -> None:
    """A second node on a home that one runs on refuses to start, naming the
    process; the lock is free again once the first has stopped, and
    commands that need the node stopped see who holds it."""
    import os

    import pytest

    from p2pinfer.errors import ConfigError
    from p2pinfer.homelock import holder_of

    (home,) = make_network(tmp_path, ["n"], roles=["auth"])
    first = Node(node_config(home, roles=["auth"]))
    await nursery.start(first.run)
    assert holder_of(home) == str(os.getpid())
    second = Node(node_config(home, roles=["auth"]))
    with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
        await second.run()
    first.stop()
    await wait_for(lambda: holder_of(home) is None, limit=10)
    again = Node(node_config(home, roles=["auth"]))
    await nursery.start(again.run)
    again.stop()
