"""Checkpoints of the main lane (p2pinfer.ledger.checkpoints): a node that
loads one and applies the events after it holds the same state as one that
replayed everything; an erased user's data leaves every stored checkpoint;
pruned events are neither needed nor served; a forged or tampered
checkpoint is refused.

Store-level tests use real SQLite files and the ledger scenario of
test_ledger_store (every event kind and merge rule, an erasure and a
removal); the swarm test runs real nodes on loopback."""

from __future__ import annotations

import uuid
import zlib
from pathlib import Path

import pytest
import trio

from p2pinfer import errors
from p2pinfer.ledger import Ledger, Store, checkpoints
from p2pinfer.ledger.checkpoints import (
    Checkpoint,
    CheckpointHeader,
    Checkpoints,
    make_checkpoint,
    open_checkpoint,
)
from p2pinfer.wire import pack, unpack

from .helpers import make_network, node_config, run_nodes, wait_for
from .test_ledger_store import SCENARIO, T0, assert_no_pii, open_store

EVENTS = SCENARIO.events
NET = SCENARIO.network.network_id


def checkpoint_of(store: Store, maker: str = "a1") -> tuple[Checkpoint, bytes]:
    vv, columns, tables = store.read_state()
    docs = [d.to_wire() for d in store.membership.docs()]
    ckpt = make_checkpoint(SCENARIO.ids[maker], NET, vv, columns, tables, docs, made_at=T0 + 50)
    return ckpt, ckpt.body()


def state(store: Store) -> dict[str, object]:
    """The replicated state: every table but the request logs (legacy
    ``request.logged`` rows are not carried by checkpoints)."""
    snap = store.snapshot()
    snap.pop("request_logs")
    return snap


def _removal_split(k: int) -> bool:
    """x's third event applied but not yet the removal that voids it: a
    checkpoint made then keeps it (docs/security.md, "Checkpoints")."""
    kinds = [(e.author, e.kind) for e in EVENTS[:k]]
    x = SCENARIO.peer("x")
    return sum(1 for a, _ in kinds if a == x) == 3 and not any(
        k == "member.removed" for _, k in kinds)


@pytest.mark.parametrize("k", [k for k in range(0, len(EVENTS) + 1, 3) if not _removal_split(k)])
def test_loading_a_checkpoint_then_the_tail_equals_replaying_everything(
        tmp_path: Path, k: int) -> None:
    reference = open_store(tmp_path / "ref.db")
    reference.ingest([e.raw for e in EVENTS])
    maker = open_store(tmp_path / "maker.db")
    maker.ingest([e.raw for e in EVENTS[:k]])
    ckpt, body = checkpoint_of(maker)
    joiner = open_store(tmp_path / "joiner.db", certs=False)  # docs come with it
    joiner.load_checkpoint(open_checkpoint(ckpt.header, body, NET), body)
    assert joiner.heads == maker.heads and joiner.floor == maker.heads
    assert joiner.count_events() <= len(SCENARIO.ids)  # admissions only
    report = joiner.ingest([e.raw for e in EVENTS])  # the whole history offered again
    assert report.duplicates >= k - len(SCENARIO.ids)
    assert state(joiner) == state(reference)
    assert_no_pii(joiner)
    again = state(joiner)
    joiner.rebuild()  # from the checkpoint it loaded, and the events above it
    assert state(joiner) == again


@pytest.mark.parametrize("seed", range(6))
def test_a_node_with_state_of_its_own_loads_a_checkpoint_and_converges(
        tmp_path: Path, seed: int) -> None:
    """A returning node holds some events, some ahead of the checkpoint and
    some waiting for earlier ones (held); it loads the checkpoint, keeps and
    applies what is above it, releases what now follows, and ends with the
    reference state."""
    import random

    rng = random.Random(seed)
    k = rng.randrange(len(EVENTS) // 3, len(EVENTS))
    while _removal_split(k):
        k -= 1
    reference = open_store(tmp_path / "ref.db")
    reference.ingest([e.raw for e in EVENTS])
    maker = open_store(tmp_path / "maker.db")
    maker.ingest([e.raw for e in EVENTS[:k]])
    ckpt, body = checkpoint_of(maker)
    returning = open_store(tmp_path / "returning.db")
    own = rng.sample(EVENTS, rng.randrange(1, len(EVENTS)))
    returning.ingest([e.raw for e in own])
    returning.load_checkpoint(open_checkpoint(ckpt.header, body, NET), body)
    assert all(returning.heads.get(a, 0) >= s for a, s in ckpt.header.vv.items())
    returning.ingest([e.raw for e in EVENTS])
    assert state(returning) == state(reference)
    assert returning.held_count == 0
    assert returning.conn.execute(
        "SELECT count(*) FROM events WHERE applied=0").fetchone() == (0,)


def test_an_erasure_after_a_checkpoint_redacts_every_stored_copy(tmp_path: Path) -> None:
    erasure = next(i for i, e in enumerate(EVENTS) if e.kind == "user.erased")
    maker = open_store(tmp_path / "maker.db")
    maker.ingest([e.raw for e in EVENTS[:erasure]])
    ckpt, body = checkpoint_of(maker)
    assert b"dave" in zlib.decompress(body)
    maker.save_checkpoint(ckpt, body)
    joiner = open_store(tmp_path / "joiner.db")
    joiner.load_checkpoint(open_checkpoint(ckpt.header, body, NET), body)
    for store in (maker, joiner):
        store.ingest([e.raw for e in EVENTS[erasure:]])
        served = store.served_checkpoint()
        assert served is not None
        header, kept = served
        assert b"dave" not in zlib.decompress(kept)
        # still the maker's checkpoint: the redacted rows keep their digests
        opened = open_checkpoint(header, kept, NET)
        assert opened.header.id == ckpt.header.id
        assert_no_pii(store)
    # A node loading the redacted checkpoint and the tail ends as everyone else.
    header, kept = maker.served_checkpoint() or (None, b"")
    assert header is not None
    late = open_store(tmp_path / "late.db")
    late.load_checkpoint(open_checkpoint(header, kept, NET), kept)
    late.ingest([e.raw for e in EVENTS])
    reference = open_store(tmp_path / "ref.db")
    reference.ingest([e.raw for e in EVENTS])
    assert state(late) == state(reference)
    status = dict(late.conn.execute("SELECT user_id, status FROM registrations"))
    assert status[EVENTS[erasure].body["user_id"]] == "erased"
    late.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert b"dave" not in (tmp_path / "late.db").read_bytes()


def test_a_node_that_erased_a_user_stores_no_older_checkpoint_naming_them(
        tmp_path: Path) -> None:
    """A returning node that already applied an erasure loads a checkpoint
    made before it: the copy it keeps (and serves) is redacted too."""
    erasure = next(i for i, e in enumerate(EVENTS) if e.kind == "user.erased")
    maker = open_store(tmp_path / "maker.db")
    maker.ingest([e.raw for e in EVENTS[:erasure]])
    ckpt, body = checkpoint_of(maker)
    assert b"dave" in zlib.decompress(body)
    returning = open_store(tmp_path / "returning.db")
    returning.ingest([EVENTS[erasure].raw])  # the erasure, held for its author's gap
    returning.load_checkpoint(open_checkpoint(ckpt.header, body, NET), body)
    served = returning.served_checkpoint()
    assert served is not None and b"dave" not in zlib.decompress(served[1])
    assert open_checkpoint(served[0], served[1], NET).header.id == ckpt.header.id


def test_pruned_events_are_covered_not_applied_again(tmp_path: Path) -> None:
    store = open_store(tmp_path / "a.db")
    store.ingest([e.raw for e in EVENTS])
    before = state(store)
    ckpt, body = checkpoint_of(store)
    store.save_checkpoint(ckpt, body)
    gone = store.prune(ckpt.header)
    assert gone > 0 and store.floor == store.heads
    kept = {k for (k,) in store.conn.execute("SELECT DISTINCT kind FROM events")}
    assert kept <= {"member.admitted", "member.removed", "request.logged"}
    report = store.ingest([e.raw for e in EVENTS])  # a peer sends old events again
    assert not report.applied and state(store) == before
    store.rebuild()
    assert state(store) == before
    assert store.prune(ckpt.header) == 0
    # reopened: the floor and the base survive
    store.close()
    reopened = open_store(tmp_path / "a.db")
    assert reopened.floor == ckpt.header.vv
    reopened.rebuild()
    assert state(reopened) == before


def test_a_tampered_or_forged_checkpoint_is_refused(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(tmp_path / "a.db")
    store.ingest([e.raw for e in EVENTS])
    ckpt, body = checkpoint_of(store)
    # a row changed: the root no longer matches
    usage = ckpt.tables["usage_stats"]
    row = list(usage[0])  # type: ignore[arg-type]
    row[ckpt.columns["usage_stats"].index("request_count")] += 1000
    usage[0] = row
    with pytest.raises(errors.InvalidEvent, match="root"):
        open_checkpoint(ckpt.header, ckpt.body(), NET)
    # signed by someone else than the maker it names
    header = CheckpointHeader(**{**ckpt.header.__dict__, "maker": SCENARIO.peer("a2")})
    with pytest.raises(errors.BadSignature):
        open_checkpoint(header, body, NET)
    with pytest.raises(errors.InvalidEvent, match="network"):
        open_checkpoint(CheckpointHeader(**{**ckpt.header.__dict__, "network": "other"}),
                        body, NET)
    with pytest.raises(errors.InvalidEvent):
        open_checkpoint(ckpt.header, b"garbage", NET)
    monkeypatch.setattr(checkpoints, "MAX_BODY_BYTES", 1 << 20)
    with pytest.raises(errors.InvalidEvent, match="over"):  # a zip bomb is cut off
        open_checkpoint(ckpt.header, zlib.compress(b"\0" * (2 << 20), 9), NET)
    for bad in (None, {}, {"v": 1}, {**ckpt.header.to_wire(), "root": b"x"},
                {**ckpt.header.to_wire(), "vv": {"a": -1}}):
        with pytest.raises(errors.InvalidParams):
            CheckpointHeader.from_wire(bad)


def test_only_a_member_granted_auth_may_make_one(tmp_path: Path) -> None:
    source = open_store(tmp_path / "src.db")
    source.ingest([e.raw for e in EVENTS[:10]])
    ident = SCENARIO.ids["a2"]
    ledger = Ledger.open(tmp_path / "l.db", ident, SCENARIO.network, SCENARIO.certs["a2"])
    taker = Checkpoints(ledger, None)
    ckpt, body = checkpoint_of(source, maker="g1")  # a gateway
    with pytest.raises(errors.UnauthorizedAuthor):
        taker.take(open_checkpoint(ckpt.header, body, NET), body)
    assert ledger.store.newest_checkpoint() is None
    ckpt, body = checkpoint_of(source, maker="a1")
    taker.take(open_checkpoint(ckpt.header, body, NET), body)
    assert ledger.store.newest_checkpoint() == ckpt.header
    ledger.close()


def test_the_header_round_trips(tmp_path: Path) -> None:
    store = open_store(tmp_path / "a.db")
    store.ingest([e.raw for e in EVENTS[:5]])
    ckpt, _ = checkpoint_of(store)
    assert CheckpointHeader.from_wire(unpack(pack(ckpt.header.to_wire()))) == ckpt.header
    assert ckpt.header.events == sum(store.heads.values())


# --- real nodes ---------------------------------------------------------------------
LEDGER = {"sync_interval": 0.2, "checkpoint_events": 60, "checkpoint_catchup": 20,
          "prune_after_days": 0}


def usage(i: int, user: str) -> dict[str, object]:
    return {"entries": [{"user_id": user, "key_id": None, "hour": int(T0) // 3600 * 3600,
                         "requests": 1, "tokens": i}]}


def no_carol(path: Path) -> None:
    for name in (path, Path(f"{path}-wal")):
        if name.exists():
            assert b"carol@example.org" not in name.read_bytes(), name


async def test_a_node_joins_from_a_pruned_peers_checkpoint(tmp_path: Path) -> None:
    """A hub (auth, gateway) writes a few hundred events, makes checkpoints
    and prunes; so does a worker that only replicates. A node that joins
    through the worker loads the worker's copy of the checkpoint and pulls
    the tail; a pull of pruned events is refused with CheckpointRequired;
    a user erased after the checkpoint is in no node's file."""
    homes = make_network(tmp_path, ["hub", "worker", "late"],
                         roles=[["auth", "gateway"], ["inference"], ["inference"]])
    tables = {"ledger": LEDGER}
    carol = str(uuid.uuid4())
    async with trio.open_nursery() as nursery:
        async with run_nodes(nursery, [node_config(homes[0], roles=[], tables=tables)]) as (hub,):
            async with run_nodes(nursery, [node_config(
                    homes[1], roles=[], bootstrap=[hub.addrs[0]], tables=tables)]) as (worker,):
                hub.ledger.append("user.registered", {
                    "user_id": carol, "username": "carol", "email": "carol@example.org",
                    "password_hash": "argon2-of-carol", "created_at": T0})
                for i in range(150):
                    hub.ledger.append("usage", usage(i, carol))
                with trio.fail_after(30):
                    await wait_for(lambda: worker.ledger.store.floor
                                   and hub.ledger.store.floor, limit=30)
                assert hub.ledger.checkpoints.made >= 1
                # (it usually had every event and only keeps the checkpoint; a
                # worker slower to receive them than the hub to make it loads it)
                assert worker.ledger.checkpoints.loaded <= 1
                assert worker.ledger.store.count_events() < 20
                hub.ledger.erase_user(carol)
                for i in range(5):
                    hub.ledger.append("usage", usage(i, carol))
                target = hub.ledger.version_vector()
                with trio.fail_after(20):
                    await worker.ledger.wait_for_version(target)
                late_config = node_config(homes[2], roles=[], bootstrap=[worker.addrs[0]],
                                          tables=tables)
                async with run_nodes(nursery, [late_config]) as (late,):
                    with trio.fail_after(30):
                        await late.ledger.wait_for_version(target)
                    assert late.ledger.checkpoints.loaded == 1
                    everyone = (hub, worker, late)
                    with trio.fail_after(20):  # late's own admission reaches the others
                        for node in everyone:
                            await node.ledger.wait_for_version(late.ledger.version_vector())
                    assert late.ledger.store.count_events() < 20
                    for node in (worker, late):
                        assert state(node.ledger.store) == state(hub.ledger.store)
                    used = hub.ledger.usage(user_id=carol)
                    assert sum(u.request_count for u in used) == 155
                    assert sum(u.request_count
                               for u in late.ledger.usage(user_id=carol)) == 155
                    # pruned events are not served
                    with pytest.raises(errors.CheckpointRequired):
                        async with late.rpc.stream(hub.peer_id, "ledgerPull",
                                                   {"after": {hub.peer_id: 0}}) as chunks:
                            async for _ in chunks:
                                pass
                    header = CheckpointHeader.from_wire((await late.rpc.call(
                        hub.peer_id, "ledgerSync", {"vv": {}}))["ckpt"])
                    assert header.maker == hub.peer_id
                    for node in everyone:
                        node.ledger.store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                        no_carol(node.config.database_path)
                        served = node.ledger.store.served_checkpoint()
                        assert served is not None
                        assert b"carol@example.org" not in zlib.decompress(served[1])


@pytest.mark.parametrize("key, value, message", [
    ("checkpoint_events", -1, "ledger.checkpoint_events: must be >= 0"),
    ("checkpoint_catchup", "many", "ledger.checkpoint_catchup: must be an integer"),
    ("prune_after_days", -2, "ledger.prune_after_days: must be >= -1"),
])
def test_bad_checkpoint_settings_name_their_key(tmp_path: Path, key: str, value: object,
                                                message: str) -> None:
    from p2pinfer.config import NodeConfig
    from p2pinfer.ledger import LedgerSettings

    cfg = NodeConfig.from_mapping({"node": {"home": str(tmp_path)}, "ledger": {key: value}},
                                  env={})
    with pytest.raises(errors.ConfigError, match=message.replace(".", r"\.")):
        LedgerSettings.from_section(cfg.section("ledger"))


def test_an_erasure_lists_registrations_folded_into_a_checkpoint(tmp_path: Path) -> None:
    """An auth node that pruned a user's registration still lists it when it
    erases the user, so a node that holds the event (it has not pruned)
    replaces it by a stub."""
    ident = SCENARIO.ids["a1"]
    pruned = Ledger.open(tmp_path / "a1.db", ident, SCENARIO.network, SCENARIO.certs["a1"])
    pruned.store.absorb_docs(SCENARIO.cert_docs())
    pruned.store.ingest([e.raw for e in EVENTS])
    zed = str(uuid.uuid4())
    pruned.append("user.registered", {"user_id": zed, "username": "zed",
                                      "email": "zed@example.org", "password_hash": "h-zed",
                                      "created_at": T0 + 60})
    pruned.append("user.updated", {"user_id": zed, "password_hash": "h-zed-2",
                                   "sessions_after": T0 + 61, "updated_at": T0 + 61})
    keeper = open_store(tmp_path / "keeper.db")  # holds every event, prunes nothing
    keeper.ingest([e.raw for e in EVENTS])
    me = ident.peer_id
    keeper.ingest(pruned.store.read_range(me, keeper.heads.get(me, 0), 100))
    vv, columns, tables = pruned.store.read_state()
    ckpt = make_checkpoint(ident, NET, vv, columns, tables,
                           [d.to_wire() for d in pruned.store.membership.docs()])
    pruned.store.save_checkpoint(ckpt)
    assert pruned.store.prune(ckpt.header) > 0
    assert pruned.store.conn.execute(
        "SELECT count(*) FROM events WHERE kind='user.registered'").fetchone() == (0,)
    erasures = pruned.erase_user(zed)
    assert len(erasures[0].body["redacts"]) == 2  # the registration and the password change
    keeper.ingest([e.raw for e in erasures])
    for table in ("events", "users", "registrations", "user_attrs"):
        for row in keeper.conn.execute(f"SELECT * FROM {table}"):
            assert b"zed" not in repr(row).encode(), (table, row)
    assert state(keeper) == state(pruned.store)
    pruned.close()
