"""The gateway's usage recorder on a real ledger file: a key's last use is
written at most once per interval, and no use is lost."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import trio

from p2pinfer.gateway.usage import UsageRecorder

from .helpers import wait_for


def local_ledger(tmp_path: Path) -> Any:
    from p2pinfer.identity import Identity
    from p2pinfer.ledger import Ledger
    from p2pinfer.ledger.membership import admit, create_network

    owner = create_network(tmp_path, name="usage")
    me = Identity.load_or_create(tmp_path)
    return Ledger.open(tmp_path / "node.db", me, owner.network,
                       admit(owner, me.peer_id, ["gateway"]))


def key_use_events(ledger: Any) -> list[dict[str, float]]:
    from p2pinfer.ledger.events import decode_trusted

    rows = ledger.store.conn.execute(
        "SELECT raw FROM events WHERE kind='apikey.used' ORDER BY seq").fetchall()
    return [{e["key_id"]: e["at"] for e in decode_trusted(r[0]).body["entries"]}
            for r in rows]


async def test_a_keys_use_is_written_once_per_interval(tmp_path: Path) -> None:
    ledger = local_ledger(tmp_path)
    now = [0.0]
    rec = UsageRecorder(ledger, key_use_interval=60, clock=lambda: now[0])
    user, busy, other = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())

    def use(key: str, at: float) -> None:
        rec.record(user_id=user, api_key_id=key, model="m", prompt_sha256="ab" * 32,
                   status="success", tokens=1, latency_ms=1.0, now=at)

    use(busy, 1000.0)
    rec.flush()
    assert key_use_events(ledger) == [{busy: 1000.0}]
    # one flush a second for 30 s: usage every time, the busy key's use held back,
    # a key not seen before written at once
    for i in range(1, 31):
        now[0] = float(i)
        use(busy, 1000.0 + i)
        if i == 10:
            use(other, 1010.0)
        rec.flush()
    assert key_use_events(ledger) == [{busy: 1000.0}, {other: 1010.0}]
    assert sum(r.request_count for r in ledger.usage(user_id=user)) == 32
    assert rec.pending() == 1  # the held key use
    # still busy when the interval has passed: written with the next batch
    now[0] = 60.0
    use(other, 1060.0)
    rec.flush()
    assert key_use_events(ledger)[-1] == {busy: 1030.0}  # other's still held
    # a flush with nothing else to write writes what is held at once
    now[0] = 61.0
    rec.flush()
    assert key_use_events(ledger)[-1] == {other: 1060.0} and rec.pending() == 0
    # the last flush (the gateway stopping) writes whatever waits
    now[0] = 62.0
    use(busy, 1062.0)
    rec.flush()
    assert key_use_events(ledger)[-1] == {other: 1060.0}
    rec.flush(force=True)
    assert key_use_events(ledger)[-1] == {busy: 1062.0}
    assert rec.flush(force=True) == 0 and rec.pending() == 0


async def test_a_running_recorder_writes_held_key_uses_once_idle(tmp_path: Path) -> None:
    ledger = local_ledger(tmp_path)
    rec = UsageRecorder(ledger, flush_interval=0.05)
    user, key = str(uuid.uuid4()), str(uuid.uuid4())

    def use(at: float) -> None:
        rec.record(user_id=user, api_key_id=key, model="m", prompt_sha256="ab" * 32,
                   status="success", tokens=1, latency_ms=1.0, now=at)

    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        use(2000.0)
        with trio.fail_after(5):
            await rec.wait_flushed()
        use(2001.0)  # within the minute: held while the batch carrying it is written
        use(2002.0)
        await wait_for(lambda: rec.pending() == 0, limit=5)  # the next, idle, tick
        assert key_use_events(ledger) == [{key: 2000.0}, {key: 2002.0}]
        use(2003.0)  # held again; the recorder stopping writes it
        nursery.cancel_scope.cancel()
    assert key_use_events(ledger)[-1] == {key: 2003.0}
