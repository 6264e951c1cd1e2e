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
