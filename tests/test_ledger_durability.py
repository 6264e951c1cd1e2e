"""A node process killed with SIGKILL in the middle of a burst of writes loses
no committed event and restarts clean.

The child node runs this file as a script (``python test_ledger_durability.py
child <home> <bootstrap>``): it appends events as fast as it can and prints
each committed seq, so the parent knows exactly what was acknowledged.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel

from p2pinfer.config import NodeConfig
from p2pinfer.node import Node

if __name__ != "__main__":  # the child process needs none of the test helpers
    from .helpers import make_network, run_network

LEDGER = {"ledger": {"sync_interval": 0.5}}
REPO = Path(__file__).resolve().parents[1]


def child_config(home: Path, bootstrap: str) -> NodeConfig:
    return NodeConfig.from_mapping({
        "node": {"home": str(home), "roles": [], "listen": ["/ip4/127.0.0.1/tcp/0"],
                 "bootstrap": [bootstrap]},
        **LEDGER,
    }, env={})


async def child(home: Path, bootstrap: str) -> None:
    node = Node(child_config(home, bootstrap))
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        print("ready", flush=True)
        i = 0
        while True:  # until killed
            body = {"actor": "writer", "action": "burst", "outcome": "ok", "time": time.time(),
                    "detail": {"i": i}}
            if i % 3:
                events = [node.ledger.append("audit", body)]
            else:
                events = node.ledger.append_many([("audit", body)] * 10)
            print(f"committed {events[-1].seq}", flush=True)
            i += 1
            await trio.lowlevel.checkpoint()  # let replication run between writes


def log_file(path: Path) -> Any:
    return open(path, "wb")


async def read_lines(stream: Any, out: list[str], ready: trio.Event, enough: trio.Event,
                     need: int) -> None:
    buf = b""
    async for data in stream:
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            text = line.decode()
            out.append(text)
            if text == "ready":
                ready.set()
            elif text.startswith("committed ") and int(text.split()[1]) >= need:
                enough.set()


async def test_sigkill_during_burst_loses_nothing_and_restarts_clean(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    homes = make_network(tmp_path, 2, roles=[["auth", "gateway"]] * 2)
    with trio.fail_after(120):
        async with run_network(nursery, homes[:1], tables=LEDGER) as (peer,):
            stderr = log_file(tmp_path / "child.stderr")
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            proc = await trio.lowlevel.open_process(
                [sys.executable, __file__, "child", str(homes[1]), peer.addrs[0]],
                stdout=-1, stderr=stderr, env=env)
            lines: list[str] = []
            ready, enough = trio.Event(), trio.Event()
            try:
                async with trio.open_nursery() as reader:
                    reader.start_soon(read_lines, proc.stdout, lines, ready, enough, 400)
                    await ready.wait()
                    await enough.wait()
                    proc.send_signal(signal.SIGKILL)
                    await proc.wait()
                    # the reader ends at EOF, with every line printed before the kill
            finally:
                if proc.returncode is None:
                    proc.kill()
                stderr.close()
            assert proc.returncode == -signal.SIGKILL, (tmp_path / "child.stderr").read_text()
            acked = max(int(x.split()[1]) for x in lines if x.startswith("committed "))
            assert acked >= 400

            # every acknowledged event is on disk, and the store opens clean
            cfg = child_config(homes[1], peer.addrs[0])
            back = Node(cfg)
            child_id = back.peer_id
            store = back.ledger.store
            assert store.integrity_check() == "ok"
            head = store.heads[child_id]
            assert head >= acked and store.held_count == 0
            seqs = [s for (s,) in store.conn.execute(
                "SELECT seq FROM events WHERE author=? ORDER BY seq", (child_id,))]
            assert seqs == list(range(1, head + 1))
            before = store.snapshot()
            store.rebuild()
            assert store.snapshot() == before

            # restart: the node carries on after its last event, and the peer,
            # which replicated during the burst, ends up with exactly the same
            await nursery.start(back.run)
            ev = back.ledger.append("audit", {"actor": "writer", "action": "after-restart",
                                              "outcome": "ok", "time": time.time()})
            assert ev.seq == head + 1
            await peer.ledger.wait_for_event(child_id, ev.seq)
            await back.ledger.wait_for_version(peer.ledger.version_vector())
            assert peer.ledger.store.snapshot() == back.ledger.store.snapshot()
            assert peer.ledger.metrics.rejected_count("replayed") == 0
            back.stop()
            peer.stop()


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    trio.run(child, Path(sys.argv[2]), sys.argv[3])
