"""The log lane (p2pinfer.ledger.logs): request logs stay with the gateway
that served them and its keepers; an inference-only worker never receives
one; readers gather them across nodes; old ones expire.

The store-level tests use real SQLite files; the swarm tests run real nodes
on loopback, with requests through the gateways' real RPC path."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

from p2pinfer import errors
from p2pinfer.identity import Identity
from p2pinfer.ledger import Store, membership
from p2pinfer.ledger.clock import hlc_from_wall
from p2pinfer.ledger.events import sign_event
from p2pinfer.ledger.logs import rendezvous

from .helpers import make_network, node_config, run_nodes, wait_for
from .test_gateway import ask, gateways_see_workers, new_user_with_key

NOW = time.time()


def row(n: int, user: str, at: float = NOW) -> dict[str, Any]:
    return {"id": str(uuid.UUID(int=n, version=4)), "user_id": user, "api_key_id": None,
            "prompt_hash": "ab" * 32, "model_used": "fake", "response_time_ms": 1.5,
            "tokens_used": 3, "status": "success", "created_at": at}


class Net:
    """A network with a gateway, an auth node and an inference-only worker."""

    def __init__(self) -> None:
        owner_id = Identity.generate()
        self.network = membership.NetworkInfo(membership.network_id_for(owner_id.public_key),
                                              owner_id.public_key)
        self.owner = membership.Owner(owner_id, self.network)
        self.ids = {name: Identity.generate() for name in ("gw", "auth", "worker")}
        roles = {"gw": ["gateway"], "auth": ["auth"], "worker": ["inference"]}
        self.certs = {name: membership.admit(self.owner, ident.peer_id, roles[name],
                                             now=NOW - 100)
                      for name, ident in self.ids.items()}

    def store(self, path: Path) -> Store:
        store = Store(path, self.network)
        store.absorb_docs([c.to_wire() for c in self.certs.values()])
        return store

    def event(self, name: str, seq: int, kind: str, body: dict[str, Any],
              at: float = NOW) -> Any:
        return sign_event(self.ids[name], self.network.network_id, seq, hlc_from_wall(at),
                          kind, body)


@pytest.fixture
def net() -> Net:
    return Net()


def test_a_gateways_logs_go_to_its_log_lane_not_its_sequence(net: Net, tmp_path: Path) -> None:
    gw = net.store(tmp_path / "gw.db")
    user = str(uuid.uuid4())
    usage = {"entries": [{"user_id": user, "key_id": None, "hour": int(NOW) // 3600 * 3600,
                          "requests": 2, "tokens": 6}]}
    events = gw.append(net.ids["gw"], [("usage", usage),
                                       ("log.requests", {"rows": [row(1, user), row(2, user)]}),
                                       ("log.requests", {"rows": [row(3, user)]})])
    me = net.ids["gw"].peer_id
    assert [e.kind for e in events] == ["usage", "log.requests", "log.requests"]
    assert [e.seq for e in events] == [1, 1, 2]  # two sequences of their own
    assert gw.heads == {me: 1} and gw.log_heads == {me: 2}
    assert gw.conn.execute("SELECT kind FROM events").fetchall() == [("usage",)]
    assert gw.conn.execute("SELECT count(*) FROM log_events").fetchone()[0] == 2
    assert gw.conn.execute("SELECT count(*) FROM request_logs").fetchone()[0] == 3
    # the views are rebuilt from both lanes
    before = gw.snapshot()
    gw.rebuild()
    assert gw.snapshot() == before
    # after a restart the log lane continues where it was
    gw.close()
    again = Store(tmp_path / "gw.db", net.network)
    assert again.log_heads == {me: 2}
    (ev,) = again.append(net.ids["gw"], [("log.requests", {"rows": [row(4, user)]})])
    assert ev.seq == 3


def test_lanes_cannot_be_crossed(net: Net, tmp_path: Path) -> None:
    """A log-lane event is refused in an author's sequence (it would take a
    main-lane number and make the author's real event there a "replay"), and
    a main-lane event is refused as a log."""
    store = net.store(tmp_path / "s.db")
    user = str(uuid.uuid4())
    logged = net.event("gw", 1, "log.requests", {"rows": [row(1, user)]})
    report = store.ingest([logged.raw])
    assert isinstance(report.rejected[0], errors.InvalidEvent) and store.heads == {}
    usage = net.event("gw", 1, "usage", {"entries": [{
        "user_id": user, "key_id": None, "hour": int(NOW) // 3600 * 3600, "requests": 1,
        "tokens": 3}]})
    report = store.ingest_logs([usage.raw])
    assert isinstance(report.rejected[0], errors.InvalidEvent) and store.log_heads == {}
    # and the real main-lane event #1 is still taken
    assert store.ingest([usage.raw]).applied


def test_pulled_logs_are_checked(net: Net, tmp_path: Path) -> None:
    keeper = net.store(tmp_path / "k.db")
    user = str(uuid.uuid4())
    one = net.event("gw", 1, "log.requests", {"rows": [row(1, user)]})
    two = net.event("gw", 2, "log.requests", {"rows": [row(2, user)]})
    report = keeper.ingest_logs([two.raw, one.raw, one.raw])
    assert len(report.applied) == 2 and report.duplicates == 1
    assert keeper.log_heads == {net.ids["gw"].peer_id: 2}
    # the same number with other content: a replay
    forged = net.event("gw", 2, "log.requests", {"rows": [row(9, user)]})
    report = keeper.ingest_logs([forged.raw])
    assert isinstance(report.rejected[0], errors.ReplayedEvent)
    # only gateways write logs; a bad signature is refused
    by_auth = net.event("auth", 1, "log.requests", {"rows": [row(5, user)]})
    assert isinstance(keeper.ingest_logs([by_auth.raw]).rejected[0], errors.KindNotAllowed)
    tampered = bytearray(net.event("gw", 3, "log.requests", {"rows": [row(6, user)]}).raw)
    tampered[-1] ^= 1
    assert isinstance(keeper.ingest_logs([bytes(tampered)]).rejected[0], errors.BadSignature)
    rows = keeper.conn.execute("SELECT id FROM request_logs ORDER BY id").fetchall()
    assert [r[0] for r in rows] == [row(1, user)["id"], row(2, user)["id"]]
    # a removed gateway logs nothing more
    removal = membership.make_removal(net.owner, net.ids["gw"].peer_id, 0)
    keeper.absorb_docs([removal.to_wire()])
    later = net.event("gw", 3, "log.requests", {"rows": [row(7, user)]})
    assert isinstance(keeper.ingest_logs([later.raw]).rejected[0], errors.UnauthorizedAuthor)


def test_request_logs_and_audit_rows_expire(net: Net, tmp_path: Path) -> None:
    gw = net.store(tmp_path / "gw.db")
    user = str(uuid.uuid4())
    day = 86400.0
    old_rows, new_rows = [row(1, user, NOW - 40 * day)], [row(2, user, NOW)]
    gw.ingest_logs([net.event("gw", 1, "log.requests", {"rows": old_rows}, at=NOW - 40 * day).raw,
                    net.event("gw", 2, "log.requests", {"rows": new_rows}).raw])
    gw.ingest([net.event("auth", 1, "audit", {"actor": "user:x", "action": "user.login",
                                              "outcome": "success", "time": NOW - 400 * day},
                         at=NOW - 400 * day).raw,
               net.event("auth", 2, "audit", {"actor": "user:x", "action": "user.login",
                                              "outcome": "success", "time": NOW}).raw])
    gone = gw.expire(logs_before=NOW - 30 * day, audit_before=NOW - 365 * day)
    assert gone == {"log_events": 1, "request_logs": 1, "audit": 1}
    assert [r[0] for r in gw.conn.execute("SELECT id FROM request_logs")] == [new_rows[0]["id"]]
    assert gw.conn.execute("SELECT count(*) FROM audit").fetchone()[0] == 1
    # the head stays: what expired here is not taken again from a peer
    assert gw.log_heads[net.ids["gw"].peer_id] == 2
    assert gw.read_log_range(net.ids["gw"].peer_id, 0, 10)[0][0] == 2
    assert gw.expire(logs_before=None, audit_before=None) == {
        "log_events": 0, "request_logs": 0, "audit": 0}


def test_rendezvous_ranks_the_same_everywhere_and_moves_little() -> None:
    peers = [f"peer{i}" for i in range(10)]
    top = rendezvous("author", peers, 3)
    assert top == rendezvous("author", list(reversed(peers)), 3) and len(top) == 3
    # removing one keeper brings in the next; the others stay
    rest = rendezvous("author", [p for p in peers if p != top[0]], 3)
    assert rest[:2] == top[1:] and top[0] not in rest
    # authors spread over the candidates
    assert len({rendezvous(f"a{i}", peers, 1)[0] for i in range(40)}) > 3
    assert rendezvous("author", peers, 0) == [] and rendezvous("a", [], 2) == []


# -- a swarm of real nodes -------------------------------------------------------------
def synthetic() -> dict[str, Any]:
    return {"models": [{"name": "fake", "backend": "synthetic", "tokens": 3}]}


LEDGER = {"sync_interval": 0.5, "log_replicas": 2}
ROLES = {
    "k1": ["auth", "metrics"],  # keepers: they are granted auth or metrics
    "k2": ["auth"],
    "k3": ["metrics"],
    "g1": ["gateway"],
    "g2": ["gateway"],
    "g3": ["gateway"],
    "w": ["inference"],          # an inference-only worker
}


async def test_logs_stay_with_gateways_and_keepers_through_a_loss(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    names = list(ROLES)
    homes = make_network(tmp_path, names, roles=[ROLES[n] for n in names])
    tables = {**synthetic(), "ledger": LEDGER, "gateway": {"usage_flush_interval": 0.1},
              "metrics": {"prometheus_port": 0},
              "auth": {"argon2_memory_kib": 1024, "argon2_time_cost": 1,
                       "registration_wait": 0}}
    with trio.fail_after(150):
        async with run_nodes(nursery, [node_config(homes[0], roles=ROLES["k1"],
                                                   tables=tables)]) as (k1,):
            configs = [node_config(h, roles=ROLES[n], bootstrap=[k1.addrs[0]], tables=tables,
                                   descriptor_ttl=1.0, announce_interval=1.0)
                       for n, h in zip(names[1:], homes[1:], strict=True)]
            async with run_nodes(nursery, configs) as rest:
                nodes = dict(zip(names, [k1, *rest], strict=True))
                gateways = [nodes[g] for g in ("g1", "g2", "g3")]
                keepers = [nodes[k] for k in ("k1", "k2", "k3")]
                worker = nodes["w"]
                await wait_for(lambda: all(len(n.ledger.members()) == len(nodes)
                                           for n in nodes.values()), limit=30)
                await gateways_see_workers(gateways, "fake", 1)
                creds = await new_user_with_key(k1)
                user = creds["user_id"]
                await wait_for(lambda: all(g.ledger.api_key_by_id(creds["key_id"])
                                           for g in gateways), limit=30)
                # 3 requests through each gateway (asked from the keeper k1)
                for g in gateways:
                    for _ in range(3):
                        await ask(k1, g.peer_id, {"api_key": creds["api_key"]},
                                  {"prompt": "hello", "model": "fake"})

                # each gateway's logs reach exactly its two keepers
                lane = k1.ledger.logs
                expected: dict[str, int] = {n.peer_id: 0 for n in nodes.values()}
                for g in gateways:
                    expected[g.peer_id] += 3
                    chosen = lane.keepers_for(g.peer_id)
                    assert len(chosen) == 2 and set(chosen) <= {k.peer_id for k in keepers}
                    for k in chosen:
                        expected[k] += 3

                def held(n: Any) -> int:
                    return len(n.ledger.request_logs(user_id=user, limit=100))

                await wait_for(lambda: all(held(n) == expected[n.peer_id]
                                           for n in nodes.values()), limit=30)
                # usage totals are everywhere, the worker included; logs are not
                await wait_for(lambda: all(
                    sum(u.request_count for u in n.ledger.usage(user_id=user)) == 9
                    for n in nodes.values()), limit=30)
                wconn = worker.ledger.store.conn
                assert wconn.execute("SELECT count(*) FROM request_logs").fetchone()[0] == 0
                assert wconn.execute("SELECT count(*) FROM log_events").fetchone()[0] == 0
                assert wconn.execute("SELECT count(*) FROM events WHERE kind IN "
                                     "('request.logged', 'log.requests')").fetchone()[0] == 0
                # ... and may not ask for them
                for method, params in (("ledgerLogPull", {"after": {g.peer_id: 0}}),
                                       ("ledgerLogs", {"user_id": user})):
                    with pytest.raises(errors.PermissionDenied):
                        async with worker.rpc.stream(gateways[0].peer_id, method,
                                                     params) as s:
                            async for _ in s:
                                pass

                # bad parameters get their own error, and the node keeps serving
                for method, params in (("ledgerLogs", {"user_id": 5}),
                                       ("ledgerLogs", {"user_id": user, "limit": 0}),
                                       ("ledgerLogPull", {"after": "everything"}),
                                       ("ledgerLogPull", {"after": {}, "limit": -1})):
                    with pytest.raises(errors.InvalidParams):
                        async with k1.rpc.stream(gateways[0].peer_id, method, params) as s:
                            async for _ in s:
                                pass
                # any reader sees all nine, whichever node holds them
                for n in (k1, nodes["g3"]):
                    assert len(await n.ledger.gather_request_logs(user)) == 9

                # lose one keeper of g1 and g1 itself: g1's logs are still read
                g1 = nodes["g1"]
                lost = lane.keepers_for(g1.peer_id)[0]
                survivor = next(k for k in keepers if k.peer_id == lane.keepers_for(
                    g1.peer_id)[1])
                for n in (g1, nodes_by_id(nodes, lost)):
                    n.stop()
                    await trio.lowlevel.checkpoint()
                reader = next(k for k in keepers if k.peer_id not in (lost,))
                await wait_for(lambda: g1.peer_id not in reader.connected_peers()
                               and lost not in reader.connected_peers(), limit=30)
                got = await reader.ledger.gather_request_logs(user)
                assert len(got) == 9, [r.gateway for r in got]
                assert len([r for r in got if r.gateway == g1.peer_id]) == 3
                assert held(survivor) >= 3


def nodes_by_id(nodes: dict[str, Any], peer_id: str) -> Any:
    return next(n for n in nodes.values() if n.peer_id == peer_id)


async def test_a_gateway_restored_from_a_backup_numbers_its_logs_after_its_keepers(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """A gateway writes request logs; its keeper pulls them; the gateway is
    restored from a backup taken before the last of them. Its keeper tells
    it the highest it holds: the gateway's next logs are numbered after it
    and accepted (none refused as a replay of a lost one)."""
    from p2pinfer.ledger.backup import backup, restore

    homes = make_network(tmp_path, ["gw", "keeper"], roles=[["gateway"], ["auth"]])
    tables = {"ledger": {"sync_interval": 0.2, "log_replicas": 1}}
    user = str(uuid.uuid4())
    out = tmp_path / "gw-backup.db"
    with trio.fail_after(60):
        async with run_nodes(nursery, [node_config(homes[1], roles=[],
                                                   tables=tables)]) as (keeper,):
            cfg = node_config(homes[0], roles=[], bootstrap=[keeper.addrs[0]], tables=tables)
            async with run_nodes(nursery, [cfg]) as (gw,):
                me = gw.peer_id
                for i in range(3):
                    gw.ledger.append("log.requests", {"rows": [row(i, user)]})
                info = backup(cfg.database_path, out, peer_id=me, network_id=gw.ledger.network_id)
                for i in range(3, 8):
                    gw.ledger.append("log.requests", {"rows": [row(i, user)]})
                assert gw.ledger.store.log_heads[me] == 8
                await wait_for(lambda: keeper.ledger.store.log_heads.get(me) == 8, limit=20)
            gw.ledger.close()
            restore(out, cfg.database_path, peer_id=me, network_id=info.network_id)
            async with run_nodes(nursery, [cfg]) as (back,):
                assert back.ledger.store.log_heads.get(me) == 3  # as the backup has it
                await wait_for(lambda: not back.ledger.fenced
                               and back.ledger.store.log_heads.get(me) == 8, limit=20)
                new = back.ledger.append("log.requests", {"rows": [row(100, user)]})
                assert new.seq == 9
                await wait_for(lambda: keeper.ledger.store.log_heads.get(me) == 9, limit=20)
                assert keeper.ledger.metrics.rejected_count("replayed") == 0
                held = {r.id for r in keeper.ledger.request_logs(user_id=user, limit=100)}
                assert len(held) == 9
