"""Backup and restore of a node's ledger store.

The main test takes a backup with the CLI (another process, SQLite's online
backup API) while two nodes write as fast as they can, lets the node write
on after the backup, stops it, restores the backup and starts it again: it
refuses to write until its peers have told it its own latest events, then
catches up with nothing missing and continues its sequence where it really
stopped, so its new events are accepted everywhere (no replay refusals).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pinfer.errors import ConfigError, StorageError
from p2pinfer.ledger.backup import backup, read_info, restore
from p2pinfer.node import Node

from .helpers import make_network, node_config, wait_for

P2PINFER = str(Path(sys.executable).parent / "p2pinfer")
LEDGER = {"ledger": {"sync_interval": 0.2}}


def audit(node: Any, i: int) -> None:
    node.ledger.append("audit", {"actor": f"peer:{node.peer_id}", "action": "load.test",
                                 "outcome": "success", "time": time.time(),
                                 "detail": {"i": i}})


def events(node: Any) -> set[tuple[str, int, bytes]]:
    return set(node.ledger.store.conn.execute(
        "SELECT author, seq, hash FROM events WHERE applied=1").fetchall())


async def start(nursery: trio.Nursery, cfg: Any) -> Node:
    node = Node(cfg)
    await nursery.start(node.run)
    return node


async def test_backup_under_load_restores_and_catches_up(tmp_path: Path,
                                                        nursery: trio.Nursery) -> None:
    homes = make_network(tmp_path, ["a", "b", "c"], roles=["auth"])
    out = tmp_path / "backups" / "a.db"
    out.parent.mkdir()
    with trio.fail_after(120):
        b = await start(nursery, node_config(homes[1], roles=[], tables=LEDGER))
        boot = [b.addrs[0]]
        c = await start(nursery, node_config(homes[2], roles=[], bootstrap=boot, tables=LEDGER))
        cfg_a = node_config(homes[0], roles=[], bootstrap=boot, tables=LEDGER)
        async with trio.open_nursery() as a_nursery:
            a = await start(a_nursery, cfg_a)
            me = a.peer_id

            # -- write load on A and B; the CLI backs A up meanwhile ---------------------
            stop_writing = trio.Event()

            async def writer(node: Any) -> None:
                i = 0
                while not stop_writing.is_set():
                    audit(node, i)
                    i += 1
                    await trio.sleep(0.002)

            async with trio.open_nursery() as load:
                load.start_soon(writer, a)
                load.start_soon(writer, b)
                await wait_for(lambda: a.ledger.store.heads.get(me, 0) > 150, limit=30)
                done = await trio.run_process(
                    [P2PINFER, "backup", "--home", str(homes[0]), "--out", str(out), "--json"],
                    capture_stdout=True, capture_stderr=True, check=False,
                    env={**os.environ, "P2PINFER_HOME": str(homes[0])})
                assert done.returncode == 0, done.stderr.decode()
                reported = json.loads(done.stdout)
                info = read_info(out)
                assert reported["own_head"] == info.own_head and info.peer_id == me
                # it was taken under load: A wrote before and writes on after it
                assert 150 < info.own_head
                await wait_for(lambda: a.ledger.store.heads[me] > info.own_head + 150,
                               limit=30)
                stop_writing.set()
            assert out.stat().st_mode & 0o077 == 0
            final = a.ledger.store.heads[me]
            # B and C hold every event A wrote, including the ones after the backup
            await wait_for(lambda: all(n.ledger.covers(a.ledger.version_vector())
                                       and a.ledger.covers(n.ledger.version_vector())
                                       for n in (b, c)), limit=30)
            a.stop()
        a.ledger.close()

        # -- restore (the node is stopped) ----------------------------------------------
        result = restore(out, cfg_a.database_path, peer_id=me,
                         network_id=a.ledger.network_id)
        assert result["backup"]["own_head"] == info.own_head
        assert len(result["moved_aside"]) >= 1
        assert any(p.name.startswith("node.db.before-restore-") for p in homes[0].iterdir())
        back = Node(cfg_a)
        assert back.ledger.fenced and back.ledger.store.heads[me] == info.own_head
        with pytest.raises(StorageError) as refused:
            audit(back, -1)  # it would reuse #info.own_head + 1: refused
        assert refused.value.data["reason"] == "restored"
        assert back.ledger.restore_quorum() == 1  # half of the 2 other members
        await nursery.start(back.run)
        await wait_for(lambda: not back.ledger.fenced, limit=30)
        # it learnt its own events back from its peers before writing anything
        assert back.ledger.store.heads[me] >= final
        assert back.ledger.statistics()["fenced"] is False
        await wait_for(lambda: back.ledger.covers(b.ledger.version_vector()), limit=30)
        assert back.ledger.store.heads[me] == final  # nothing new was written meanwhile
        assert events(back) >= events(b) and events(b) >= events(back)  # nothing missing
        assert back.ledger.store.snapshot() == b.ledger.store.snapshot()

        # -- it writes again after its real last event, and everyone accepts that -------
        for i in range(20):
            audit(back, 10_000 + i)
        assert back.ledger.store.heads[me] == final + 20
        await wait_for(lambda: all(n.ledger.store.heads.get(me) == final + 20
                                   for n in (b, c)), limit=30)
        for n in (b, c):
            assert n.ledger.metrics.rejected_count("replayed") == 0
            assert n.ledger.store.event(me, final + 1).body["detail"] == {"i": 10_000}
        for node in (back, b, c):
            node.stop()


async def test_restore_refuses_to_write_until_a_peer_answers(tmp_path: Path,
                                                             nursery: trio.Nursery) -> None:
    homes = make_network(tmp_path, ["a", "b"], roles=["auth"])
    with trio.fail_after(60):
        cfg_a = node_config(homes[0], roles=[], tables=LEDGER)
        a = Node(cfg_a)
        for i in range(5):
            audit(a, i)
        network = a.ledger.network_id
        # the other member must be known to A for the fence to wait for it
        b0 = Node(node_config(homes[1], roles=[], tables=LEDGER))
        a.ledger.store.absorb_docs([d.to_wire() for d in b0.ledger.own_docs()])
        b0.ledger.close()
        out = tmp_path / "a-backup.db"
        info = backup(cfg_a.database_path, out, peer_id=a.peer_id, network_id=network)
        assert info.own_head == 6  # its admission, then 5 audit rows
        for i in range(5, 8):
            audit(a, i)
        a.ledger.close()
        with pytest.raises(ConfigError, match="backup of node"):
            restore(out, cfg_a.database_path, peer_id="12D3KooWother", network_id=network)
        with pytest.raises(ConfigError, match="network"):
            restore(out, cfg_a.database_path, peer_id=a.peer_id, network_id="another")
        restore(out, cfg_a.database_path, peer_id=a.peer_id, network_id=network)

        # alone: nobody to ask, so it keeps refusing to write
        alone = Node(cfg_a)
        await nursery.start(alone.run)
        assert alone.ledger.fenced and alone.ledger.fence_status()["quorum_needed"] == 1
        with pytest.raises(StorageError):
            audit(alone, 100)
        # a peer that says it holds A's events up to #9 (held ones included) is not
        # enough until A has them: the fence holds
        alone.ledger.heard_version("12D3KooWnotamember", {alone.peer_id: 50}, 50)
        assert alone.ledger.fenced  # non-members are not heard
        # the peer comes (B never saw A's events after the backup): the fence lifts,
        # and A continues after the backup's last event (the later ones never left A)
        b = await start(nursery, node_config(homes[1], roles=[], bootstrap=[alone.addrs[0]],
                                             tables=LEDGER))
        await wait_for(lambda: not alone.ledger.fenced, limit=30)
        assert alone.ledger.store.heads[alone.peer_id] == 6
        audit(alone, 200)
        await wait_for(lambda: b.ledger.store.heads.get(alone.peer_id) == 7, limit=30)
        alone.stop()
        b.stop()


def test_a_single_node_network_restores_without_waiting(tmp_path: Path) -> None:
    (home,) = make_network(tmp_path, 1, roles=["auth"])
    cfg = node_config(home, roles=[])
    node = Node(cfg)
    audit(node, 1)
    out = tmp_path / "one.db"
    backup(cfg.database_path, out, peer_id=node.peer_id, network_id=node.ledger.network_id)
    network = node.ledger.network_id
    node.ledger.close()
    restore(out, cfg.database_path, peer_id=node.peer_id, network_id=network)
    again = Node(cfg)
    assert not again.ledger.fenced  # no other member could hold a later event
    audit(again, 2)
    again.ledger.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="restoring as root for another user needs root")
def test_restore_as_root_keeps_the_node_users_ownership(tmp_path: Path) -> None:
    """``sudo p2pinfer restore`` on a home the node's own user owns: the
    restored database belongs to that user, mode 0600 (as root's, the node
    could not open it and would not start)."""
    import subprocess

    (home,) = make_network(tmp_path, 1, roles=["auth"])
    cfg = node_config(home, roles=[])
    node = Node(cfg)
    audit(node, 1)
    out = tmp_path / "one.db"
    backup(cfg.database_path, out, peer_id=node.peer_id, network_id=node.ledger.network_id)
    node.ledger.close()
    uid = gid = 4242  # the node's user (no such account is needed)
    for path in [home, *home.iterdir()]:
        os.chown(path, uid, gid)
    done = subprocess.run([sys.executable, "-m", "p2pinfer.cli.main", "restore", str(out),
                           "--home", str(home)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    st = cfg.database_path.stat()
    assert (st.st_uid, st.st_gid) == (uid, gid)
    assert st.st_mode & 0o777 == 0o600
