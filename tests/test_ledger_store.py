"""The ledger store on real SQLite files: order independence, every rejection,
conflicts, removal and erasure, queries."""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pinfer import errors
from p2pinfer.identity import Identity
from p2pinfer.ledger import Ledger, Store, membership, queries
from p2pinfer.ledger.clock import hlc_from_wall
from p2pinfer.ledger.events import Event, sign_event
from p2pinfer.ledger.migrations import MIGRATIONS, applied_migrations
from p2pinfer.wire import canonical_pack, unpack

from .helpers import wait_for

T0 = float(int(time.time()) - 7200)
HOUR = int(T0) - int(T0) % 3600


def uid(n: int) -> str:
    return str(uuid.UUID(int=n, version=4))


class Scenario:
    """A network (owner + five authors) and a fixed set of signed events that
    exercises every kind and every merge rule."""

    def __init__(self) -> None:
        ident = Identity.generate()
        self.network = membership.NetworkInfo(membership.network_id_for(ident.public_key),
                                              ident.public_key)
        self.owner = membership.Owner(ident, self.network)
        self.ids: dict[str, Identity] = {}
        self.certs: dict[str, membership.SignedDoc] = {}
        for name, roles in (("a1", ["auth"]), ("a2", ["auth"]), ("g1", ["gateway"]),
                            ("g2", ["gateway", "auth"]), ("x", ["auth"])):
            self.ids[name] = Identity.generate()
            self.certs[name] = membership.admit(self.owner, self.ids[name].peer_id, roles,
                                                now=T0 - 100)
        self.seq: dict[str, int] = {}
        self.events: list[Event] = []

    def peer(self, name: str) -> str:
        return self.ids[name].peer_id

    def add(self, name: str, at: float, kind: str, body: dict[str, Any]) -> Event:
        seq = self.seq.get(name, 0) + 1
        self.seq[name] = seq
        ev = sign_event(self.ids[name], self.network.network_id, seq, hlc_from_wall(at), kind,
                        body)
        self.events.append(ev)
        return ev

    def cert_docs(self) -> list[dict[str, Any]]:
        return [c.to_wire() for c in self.certs.values()]


def reg(n: int, username: str, email: str, at: float) -> dict[str, Any]:
    return {"user_id": uid(n), "username": username, "email": email,
            "password_hash": f"hash{n}", "created_at": at}


def build_scenario() -> Scenario:
    s = Scenario()
    for i, name in enumerate(s.ids):
        s.add(name, T0 + i * 0.001, "member.admitted", {"cert": s.certs[name].to_wire()})
    # registrations: alice@a1 beats Alice@a2 (earlier hlc); bob@a1 and dave@a2
    # share an email, dave is earlier; erasing dave later frees the email for bob.
    s.add("a1", T0 + 1, "user.registered", reg(1, "alice", "alice@x.org", T0 + 1))
    s.add("a2", T0 + 2, "user.registered", reg(3, "Alice", "alice2@x.org", T0 + 2))
    dave = s.add("a2", T0 + 0.5, "user.registered", reg(4, "dave", "bob@x.org", T0 + 0.5))
    s.add("a1", T0 + 3, "user.registered", reg(2, "bob", "bob@x.org", T0 + 3))
    s.add("a1", T0 + 4, "apikey.issued", {"key_id": uid(101), "user_id": uid(1),
                                          "public_id": "pk_alice1", "key_hash": "kh1",
                                          "name": "laptop", "created_at": T0 + 4})
    s.add("a2", T0 + 5, "apikey.issued", {"key_id": uid(102), "user_id": uid(2),
                                          "public_id": "pk_bob1", "key_hash": "kh2",
                                          "name": None, "created_at": T0 + 5})
    # last writer wins per field
    s.add("a1", T0 + 6, "user.updated", {"user_id": uid(1), "tier": "premium",
                                         "updated_at": T0 + 6})
    s.add("a2", T0 + 7, "user.updated", {"user_id": uid(1), "is_active": False,
                                         "updated_at": T0 + 7})
    s.add("g2", T0 + 5.5, "user.updated", {"user_id": uid(1), "tier": "default",
                                           "updated_at": T0 + 5.5})
    s.add("a2", T0 + 8, "user.updated", {"user_id": uid(1), "is_active": True,
                                         "updated_at": T0 + 8})
    # two password changes of bob on two auth nodes: the later one wins; the
    # sessions end at the later of the two times whatever the order
    s.add("a2", T0 + 8.5, "user.updated", {"user_id": uid(2), "password_hash": "hash2-new",
                                           "sessions_after": T0 + 8.5, "updated_at": T0 + 8.5})
    s.add("a1", T0 + 8.2, "user.updated", {"user_id": uid(2), "password_hash": "hash2-mid",
                                           "sessions_after": T0 + 8.2, "updated_at": T0 + 8.2})
    # usage from two gateways, same user/key/hour: summed
    for name, n in (("g1", 3), ("g2", 5), ("g1", 7)):
        s.add(name, T0 + 9 + n / 100, "usage", {"entries": [
            {"user_id": uid(1), "key_id": uid(101), "hour": HOUR, "requests": n,
             "tokens": n * 10},
            {"user_id": uid(2), "key_id": None, "hour": HOUR + 86400, "requests": 1,
             "tokens": 2}]})
    s.add("g1", T0 + 10, "apikey.used", {"entries": [{"key_id": uid(101), "at": T0 + 10}]})
    s.add("g2", T0 + 9, "apikey.used", {"entries": [{"key_id": uid(101), "at": T0 + 9},
                                                    {"key_id": uid(102), "at": T0 + 9}]})
    row = {"id": uid(500), "user_id": uid(1), "api_key_id": uid(101), "prompt_hash": "ab" * 32,
           "model_used": "smollm2", "response_time_ms": 12.5, "tokens_used": 30,
           "status": "success", "created_at": T0 + 10}
    s.add("g1", T0 + 11, "request.logged", {"rows": [row, {**row, "id": uid(501)}]})
    s.add("g2", T0 + 10.5, "request.logged", {"rows": [{**row, "status": "error"}]})
    s.add("a1", T0 + 12, "session.revoked", {"jti": "jti-1", "exp": T0 + 3600})
    s.add("a2", T0 + 13, "session.revoked", {"jti": "jti-1", "exp": T0 + 7200})
    s.add("a1", T0 + 14, "audit", {"actor": uid(1), "action": "login", "outcome": "success",
                                   "time": T0 + 14, "source": "10.0.0.1",
                                   "detail": {"method": "password"}})
    s.add("a2", T0 + 15, "apikey.revoked", {"key_id": uid(102), "revoked_at": T0 + 15})
    s.add("a1", T0 + 16, "apikey.revoked", {"key_id": uid(102), "revoked_at": T0 + 14})
    s.add("a2", T0 + 17, "user.erased", {"user_id": uid(4), "erased_at": T0 + 17, "redacts": [
        {"author": dave.author, "seq": dave.seq, "hash": dave.hash}]})
    # x writes three events; the owner removes it after its second
    s.add("x", T0 + 18, "user.registered", reg(6, "eve", "eve@x.org", T0 + 18))
    s.add("x", T0 + 19, "user.registered", reg(7, "mallory", "m@x.org", T0 + 19))
    s.add("a1", T0 + 20, "member.removed",
          {"removal": membership.make_removal(s.owner, s.peer("x"), 2, now=T0 + 20).to_wire()})
    return s


SCENARIO = build_scenario()


@pytest.fixture
def scenario() -> Scenario:
    return SCENARIO


def open_store(path: Path, s: Scenario = SCENARIO, *, certs: bool = True) -> Store:
    store = Store(path, s.network, wall=lambda: T0 + 100)
    if certs:
        store.absorb_docs(s.cert_docs())
    return store


@pytest.fixture
def tmpdir_path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def test_reference_outcome(tmp_path: Path) -> None:
    """The merge rules, checked once on the scenario applied in order."""
    store = open_store(tmp_path / "ref.db")
    report = store.ingest([e.raw for e in SCENARIO.events])
    # the removal travels in the same batch: x's third event is void
    assert [type(r) for r in report.rejected] == [errors.UnauthorizedAuthor]
    assert report.held == 0
    conn = store.conn
    ledger_users = {r[1]: r for r in conn.execute("SELECT * FROM users")}
    # alice (earlier) beat Alice; dave was erased so bob holds bob@x.org; eve stays
    assert set(ledger_users) == {"alice", "bob", "eve"}
    alice = ledger_users["alice"]
    assert alice[6] == "premium" and alice[5] == 1  # tier: a1 wrote last; re-activated
    assert alice[3] == "hash1" and alice[-1] is None  # her password never changed
    bob = queries.user_by_id(conn, uid(2))
    assert bob is not None and bob.password_hash == "hash2-new"
    assert bob.sessions_after == T0 + 8.5
    status = dict(conn.execute("SELECT user_id, status FROM registrations"))
    assert status[uid(3)] == "lost" and status[uid(4)] == "erased" and status[uid(2)] == "won"
    assert uid(7) not in status  # x's third event was voided by its removal
    usage = conn.execute("SELECT request_count, tokens_used FROM usage_stats WHERE "
                         "api_key_id=?", (uid(101),)).fetchone()
    assert usage == (15, 150)
    keys = {r[0]: r for r in conn.execute("SELECT id, last_used_at, is_active, revoked_at "
                                          "FROM api_keys")}
    assert keys[uid(101)] == (uid(101), T0 + 10, 1, None)
    assert keys[uid(102)] == (uid(102), T0 + 9, 0, T0 + 14)
    assert conn.execute("SELECT exp FROM revoked_sessions").fetchall() == [(T0 + 7200,)]
    assert conn.execute("SELECT status FROM request_logs WHERE id=?",
                        (uid(500),)).fetchone() == ("error",)  # g2's row ranks first
    assert conn.execute("SELECT removed_after FROM members WHERE peer_id=?",
                        (SCENARIO.peer("x"),)).fetchone() == (2,)
    # erasure: dave's registration is a stub now, nothing stored names him
    assert_no_pii(store)
    assert conn.execute("SELECT count(*) FROM events WHERE redacted=1").fetchone() == (1,)
    before = store.snapshot()
    store.rebuild()
    assert store.snapshot() == before


def assert_no_pii(store: Store) -> None:
    for table in ("events", "registrations", "users", "audit", "request_logs"):
        for row in store.conn.execute(f"SELECT * FROM {table}"):
            assert b"dave" not in repr(row).encode(), (table, row)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_order_and_duplication_gives_the_same_tables(data: st.DataObject,
                                                         tmpdir_path: Path) -> None:
    events = SCENARIO.events
    n = len(events)
    keep = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="keep")
    if data.draw(st.booleans(), label="all"):
        keep = [True] * n
    chosen = [e for e, k in zip(events, keep, strict=True) if k]
    order = data.draw(st.permutations(chosen), label="order") if chosen else []
    dups = data.draw(st.lists(st.sampled_from(chosen), max_size=10), label="dups") \
        if chosen else []
    stream = list(order)
    for i, dup in enumerate(dups):
        stream.insert((i * 7919) % (len(stream) + 1), dup)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6), label="cuts"))

    reference = open_store(tmpdir_path / f"ref-{uuid.uuid4()}.db")
    reference.ingest([e.raw for e in sorted(chosen, key=lambda e: (e.author, e.seq))])
    store = open_store(tmpdir_path / f"perm-{uuid.uuid4()}.db")
    for lo, hi in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        report = store.ingest([e.raw for e in stream[lo:hi]])
        voided = [r for r in report.rejected if not isinstance(r, errors.UnauthorizedAuthor)]
        assert not voided, voided  # only x's voided event may be refused
    assert store.snapshot() == reference.snapshot()
    assert store.held_count == reference.held_count
    if keep == [True] * n:
        assert_no_pii(store)
    state = store.snapshot()
    store.rebuild()  # recomputing every table from the stored events gives the same
    assert store.snapshot() == state
    store.close()
    reference.close()


def test_erasure_stubs_replicate_without_personal_data(tmp_path: Path) -> None:
    """A peer that pulls from a node holding a redacted registration gets the
    stub, accepts it once it holds the erasure, and converges."""
    source = open_store(tmp_path / "a.db")
    source.ingest([e.raw for e in SCENARIO.events])
    heads = source.version_vector()
    sink = open_store(tmp_path / "b.db")
    deferred = 0
    for _ in range(3):  # pull rounds, author by author as ledgerPull serves them
        for author in sorted(heads):
            got = sink.version_vector().get(author, 0)
            report = sink.ingest(source.read_range(author, got, 10_000))
            deferred += report.deferred
            assert not [r for r in report.rejected
                        if not isinstance(r, errors.UnauthorizedAuthor)]
    assert deferred == 0  # the erasure came in the same pull as the stub it vouches for
    assert sink.version_vector() == heads
    assert sink.snapshot() == source.snapshot()
    assert_no_pii(sink)
    # a stub nobody vouches for is not accepted
    other = open_store(tmp_path / "c.db")
    dave = next(e for e in SCENARIO.events if e.kind == "user.registered"
                and e.body["username"] == "dave")
    stub = source.read_range(dave.author, dave.seq - 1, 1)
    assert b"dave" not in stub[0]
    report = other.ingest(stub)
    assert report.deferred == 1 and not report.rejected
    assert other.version_vector().get(dave.author, 0) < dave.seq


# --- rejections -------------------------------------------------------------------
def _forge(ident: Identity, fields: list[Any]) -> bytes:
    return canonical_pack([*fields, ident.sign(canonical_pack(fields))])


def rejection_cases(s: Scenario) -> list[tuple[str, bytes, type[errors.LedgerError], str]]:
    a1, g1 = s.ids["a1"], s.ids["g1"]
    net = s.network.network_id
    next_a1 = s.seq["a1"] + 1
    good = sign_event(a1, net, next_a1, hlc_from_wall(T0 + 30), "user.registered",
                      reg(60, "zed", "zed@x.org", T0 + 30))
    fields = unpack(good.raw)
    forged = canonical_pack([*fields[:6], {**fields[6], "username": "root"}, fields[7]])
    wrong_net = sign_event(a1, "p2p-somewhere-else", next_a1, good.hlc, "audit",
                           {"actor": "a", "action": "x", "outcome": "ok", "time": T0}).raw
    outsider = Identity.generate()
    non_member = sign_event(outsider, net, 1, good.hlc, "audit",
                            {"actor": "a", "action": "x", "outcome": "ok", "time": T0}).raw
    not_allowed = sign_event(g1, net, s.seq["g1"] + 1, good.hlc, "user.registered",
                             reg(61, "gw", "gw@x.org", T0)).raw
    replay = sign_event(a1, net, 2, good.hlc, "user.registered",
                        reg(62, "alice", "other@x.org", T0)).raw
    malformed = _forge(a1, [1, net, a1.peer_id, next_a1, good.hlc, "user.registered",
                            {**reg(63, "bad", "bad@x.org", T0), "user_id": "123"}])
    return [
        ("bad_signature", forged, errors.BadSignature, "not signed by its author"),
        ("wrong_network", wrong_net, errors.WrongNetwork, "network"),
        ("not_member", non_member, errors.UnauthorizedAuthor, "not a member"),
        ("kind_not_allowed", not_allowed, errors.KindNotAllowed, "may not write"),
        ("replayed", replay, errors.ReplayedEvent, "other content"),
        ("malformed", malformed, errors.InvalidEvent, "user_id"),
        ("malformed", canonical_pack([1, 2, 3]), errors.InvalidEvent, "8 fields"),
    ]


@pytest.mark.parametrize("index", range(7))
def test_each_rejection_has_its_class_reason_log_and_changes_nothing(
        index: int, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reason, raw, error, message = rejection_cases(SCENARIO)[index]
    store = open_store(tmp_path / "s.db")
    store.ingest([e.raw for e in SCENARIO.events])
    before = store.snapshot()
    events_before = store.conn.execute("SELECT author, seq, hash FROM events").fetchall()
    counted = store.metrics.rejected_count(reason)
    with caplog.at_level(logging.WARNING, logger="p2pinfer.ledger"):
        report = store.ingest([raw])
    assert [type(r) for r in report.rejected] == [error]
    assert message in report.rejected[0].message
    assert store.metrics.rejected_count(reason) == counted + 1
    assert any(reason in rec.getMessage() for rec in caplog.records)
    assert store.snapshot() == before
    assert store.conn.execute("SELECT author, seq, hash FROM events").fetchall() \
        == events_before


def test_local_writes_are_checked_too(tmp_path: Path) -> None:
    s = SCENARIO
    ledger = Ledger.open(tmp_path / "g.db", s.ids["g1"], s.network, s.certs["g1"])
    with pytest.raises(errors.KindNotAllowed):
        ledger.append("user.registered", reg(70, "gw", "gw@x.org", T0))
    with pytest.raises(errors.InvalidEvent):
        ledger.append("usage", {"entries": []})
    assert ledger.version_vector() == {s.peer("g1"): 1}  # only its own admission
    ev = ledger.append("usage", {"entries": [{"user_id": uid(1), "key_id": None,
                                              "hour": HOUR, "requests": 1, "tokens": 1}]})
    assert ev.seq == 2 and ledger.usage(user_id=uid(1))[0].request_count == 1


# --- holding, conflicts, queries -------------------------------------------------------
def test_out_of_order_events_are_held_then_released(tmp_path: Path) -> None:
    s = SCENARIO
    store = open_store(tmp_path / "s.db")
    a1 = [e for e in s.events if e.author == s.peer("a1")]
    report = store.ingest([e.raw for e in a1[2:]])
    assert report.held == len(a1) - 2 and not report.applied and s.peer("a1") in report.gaps
    assert store.held_count == len(a1) - 2
    store.close()
    store = open_store(tmp_path / "s.db")  # held events survive a restart
    assert store.held_count == len(a1) - 2
    report = store.ingest([a1[1].raw, a1[0].raw])
    assert [e.seq for e in report.applied] == list(range(1, len(a1) + 1))
    assert store.held_count == 0 and store.heads[s.peer("a1")] == len(a1)


def test_concurrent_registration_loser_learns_it(tmp_path: Path) -> None:
    s = SCENARIO
    ledger = Ledger.open(tmp_path / "a2.db", s.ids["a2"], s.network, s.certs["a2"])
    ledger.store.absorb_docs(s.cert_docs())
    mine = ledger.append("user.registered", reg(80, "carol", "carol@x.org", time.time()))
    ledger.check_registration(uid(80))  # locally, it won
    assert ledger.user_by_username("CAROL") is not None
    with pytest.raises(errors.UsernameTaken):
        ledger.check_available("Carol", "new@x.org")
    with pytest.raises(errors.EmailTaken):
        ledger.check_available("newname", "CAROL@x.org")
    rival = sign_event(s.ids["a1"], s.network.network_id, s.seq["a1"] + 1, mine.hlc - 1,
                       "user.registered", reg(81, "carol", "c2@x.org", 0.0))
    a1_history = [e.raw for e in s.events if e.author == s.peer("a1")]
    assert not ledger.ingest([*a1_history, rival.raw]).rejected
    with pytest.raises(errors.RegistrationLost) as info:
        ledger.check_registration(uid(80))
    assert info.value.data == {"user_id": uid(80), "winner": uid(81)}
    user = ledger.user_by_username("carol")
    assert user is not None and user.id == uid(81)


def test_queries(tmp_path: Path) -> None:
    s = SCENARIO
    ledger = Ledger.open(tmp_path / "q.db", s.ids["a1"], s.network, s.certs["a1"])
    ledger.store.absorb_docs(s.cert_docs())
    ledger.ingest([e.raw for e in s.events])
    key = ledger.api_key("pk_alice1")
    assert key is not None and key.user_id == uid(1) and key.is_active and key.user_active
    assert key.tier == "premium" and key.last_used_at == T0 + 10
    revoked = ledger.api_key("pk_bob1")
    assert revoked is not None and not revoked.is_active and revoked.revoked_at == T0 + 14
    assert ledger.api_key("pk_nobody") is None
    assert [k.id for k in ledger.api_keys_of(uid(1))] == [uid(101)]
    assert ledger.user_by_email("ALICE@x.org") == ledger.user(uid(1))
    day = ledger.usage(api_key_id=uid(101))
    assert len(day) == 1 and (day[0].request_count, day[0].tokens_used) == (15, 150)
    assert ledger.usage_in_hour(HOUR + 59, api_key_id=uid(101)) == (15, 150)
    assert ledger.usage_in_hour(HOUR, user_id=uid(1), exclude_gateway=s.peer("g1")) == (5, 50)
    assert len(ledger.usage(user_id=uid(2), since="2100-01-01")) == 0
    logs = ledger.request_logs(user_id=uid(1))
    assert {r.id for r in logs} == {uid(500), uid(501)}
    rows = ledger.audit(actor=uid(1))
    assert rows[0].action == "login" and rows[0].detail == {"method": "password"}
    assert ledger.is_session_revoked("jti-1") and not ledger.is_session_revoked("jti-2")
    assert {m.peer_id for m in ledger.members()} >= {s.peer("a1"), s.peer("x")}
    # an indexed lookup, not a scan (its speed: benchmarks/bench_auth.py)
    plan = " ".join(str(row[-1]) for row in ledger.store.conn.execute(
        "EXPLAIN QUERY PLAN " + queries._KEY_SQL + "WHERE k.public_id=? ORDER BY k.rank LIMIT 1",
        ("pk_alice1",)))
    assert "USING INDEX" in plan and "SCAN k" not in plan, plan


def test_an_erasure_lists_every_password_change_however_many(tmp_path: Path) -> None:
    """A user who changed the password 70 times: the erasure redacts the
    registration and all 70 changes (two user.erased events, the event
    format lists at most MAX_REDACTS each); no stored event keeps a hash."""
    from p2pinfer.ledger.events import MAX_REDACTS

    s = SCENARIO
    ledger = Ledger.open(tmp_path / "e.db", s.ids["a1"], s.network, s.certs["a1"])
    ledger.store.absorb_docs(s.cert_docs())
    ledger.ingest([e.raw for e in s.events])
    assert ledger.user(uid(1)) is not None
    for i in range(70):
        ledger.append("user.updated", {"user_id": uid(1), "password_hash": f"secret-hash-{i}",
                                       "sessions_after": T0 + 30 + i, "updated_at": T0 + 30 + i})
    assert ledger.user(uid(1)).password_hash == "secret-hash-69"
    erasures = ledger.erase_user(uid(1))
    listed = [r for e in erasures for r in e.body.get("redacts", [])]
    assert len(erasures) == 2 and max(len(e.body["redacts"]) for e in erasures) == MAX_REDACTS
    assert len(listed) == 71  # the registration and every change
    assert ledger.user(uid(1)) is None
    for (raw,) in ledger.store.conn.execute("SELECT raw FROM events"):
        assert b"secret-hash-" not in raw


async def test_the_log_is_checkpointed_from_a_thread_while_the_ledger_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commits on the event loop never run SQLite's checkpoint (10-15 ms on
    a busy node): a worker thread does, and the automatic one is a backstop."""
    import threading

    import trio

    from p2pinfer.ledger import ledger as ledger_module

    monkeypatch.setattr(ledger_module, "WAL_CHECKPOINT_INTERVAL", 0.05)
    s = SCENARIO
    ledger = Ledger.open(tmp_path / "c.db", s.ids["g1"], s.network, s.certs["g1"])
    store = ledger.store
    store.absorb_docs(s.cert_docs())
    threads: list[threading.Thread] = []
    results: list[tuple[int, int]] = []
    real = store.wal_checkpoint

    def checkpoint() -> tuple[int, int]:
        threads.append(threading.current_thread())
        results.append(real())
        return results[-1]

    monkeypatch.setattr(store, "wal_checkpoint", checkpoint)

    def autocheckpoint() -> int:
        return int(store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0])

    async with trio.open_nursery() as nursery:
        await nursery.start(ledger.run)
        await trio.sleep(0.2)
        assert threads == []  # nothing written, nothing to do
        assert autocheckpoint() == ledger_module.BACKSTOP_PAGES
        for i in range(5):
            ledger.append("usage", {"entries": [{"user_id": uid(i), "key_id": None,
                                                 "hour": HOUR, "requests": 1, "tokens": 2}]})
        await wait_for(lambda: bool(results), limit=5, interval=0.02)
        assert threads[0] is not threading.main_thread()
        frames, done = results[0]
        assert frames > 0 and done == frames  # the thread copied the whole log
        nursery.cancel_scope.cancel()
    assert autocheckpoint() == 1000
    ledger.close()


def test_migrations_are_recorded_and_rerun_is_a_no_op(tmp_path: Path) -> None:
    store = open_store(tmp_path / "m.db")
    names = applied_migrations(store.db)
    assert names == [fn.__name__ for fn in MIGRATIONS] and names[0].startswith("m001_")
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    again = open_store(tmp_path / "m.db")
    assert applied_migrations(again.db) == names
    assert again.integrity_check() == "ok"


def test_sqlite_failure_is_a_storage_error_and_leaves_no_trace(tmp_path: Path) -> None:
    store = open_store(tmp_path / "f.db")
    store.ingest([e.raw for e in SCENARIO.events[:10]])
    before, heads = store.snapshot(), store.version_vector()
    store.conn.execute("CREATE TRIGGER boom BEFORE INSERT ON audit BEGIN "
                       "SELECT RAISE(ABORT, 'disk on fire'); END")
    with pytest.raises(errors.StorageError, match="disk on fire"):
        store.ingest([e.raw for e in SCENARIO.events[10:]])
    assert store.snapshot() == before and store.version_vector() == heads
    with pytest.raises(errors.StorageError):
        Store(tmp_path / "f.db" / "not-a-dir.db", SCENARIO.network)
