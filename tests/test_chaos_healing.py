"""The swarm heals itself: ordinary events on real daemons in network
namespaces (one per machine, on a bridge), the node restarted being the one
everybody bootstraps from.

The layout is the documented deployment: a hub (auth, gateway) that is the
only bootstrap node, workers that join through it, every node listening on
all its interfaces on port 4001. This process is the clients.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pinfer import errors

from .chaos_harness import (
    PASSWORD,
    ClientPeer,
    Cluster,
    Observer,
    Outcome,
    ask,
    client_peer,
    connect_all,
    netns_unavailable_reason,
    read_ledger,
    record,
    register_user,
    request_hash,
    swarm_logs,
    synthetic,
)

NETNS_SKIP = netns_unavailable_reason()
pytestmark = pytest.mark.skipif(NETNS_SKIP is not None,
                                reason=f"needs network namespaces: {NETNS_SKIP}")

OPEN = {"default_rate_limit": 10**6, "concurrent_per_key": 0, "concurrent_per_user": 0,
        "usage_flush_interval": 0.5, "cooldown": 1}


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, layout: dict[str, list[str]],
                  tables: dict[str, Any]) -> AsyncIterator[tuple[Cluster, ClientPeer]]:
    c = Cluster(tmp_path / "swarm", layout, tables, netns=True, hub=True, listen_any=True)
    with c:
        try:
            await trio.to_thread.run_sync(c.start)
            # a member with no role: it may read each node's version vector
            c.observer = Observer(c)  # type: ignore[attr-defined]
            async with client_peer(c.observer.identity) as peer:  # type: ignore[attr-defined]
                yield c, peer
        except BaseException:
            print(c.logs())
            raise


async def workers_seen(peer: ClientPeer, gateway: str, key: str, model: str = "fake") -> int:
    try:
        listed = await peer.rpc.call(gateway, "listModels", {"auth": {"api_key": key}})
    except (errors.InvalidApiKey, errors.CallError):
        return 0
    return max((int(m["workers"]) for m in listed["models"] if m["name"] == model), default=0)


async def wait_workers(peer: ClientPeer, gateway: str, key: str, n: int,
                       limit: float = 30.0) -> float:
    """Seconds until ``gateway`` lists ``n`` workers of the model."""
    started = trio.current_time()
    with trio.fail_after(limit):
        while True:
            if await workers_seen(peer, gateway, key) >= n:
                return trio.current_time() - started
            await trio.sleep(0.1)


async def test_three_machines_on_port_4001_route_to_each_other(tmp_path: Path) -> None:
    """A (hub), B (gateway and worker) and C (worker), each on 0.0.0.0:4001
    of its own machine: B's gateway routes to the workers on B and C (the
    loopback addresses each announces would point B at itself)."""
    layout = {"a": ["auth", "gateway"], "b": ["gateway", "inference"], "c": ["inference"]}
    tables = {"gateway": OPEN, "b": {"models": [synthetic(tokens=4)]},
              "c": {"models": [synthetic(tokens=4)]}}
    with trio.fail_after(120):
        async with cluster(tmp_path, layout, tables) as (c, peer):
            a, b = await connect_all(peer, [c.addr_of("a"), c.addr_of("b")])
            user = await register_user(peer.rpc, a, "bea")
            await wait_workers(peer, b, user["api_key"], 2)
            served = set()
            for i in range(40):
                out = await ask(peer.rpc, b, user["api_key"], f"hello {i}")
                assert out.ok, out.error
                served.add(out.trailer["worker"])
                if len(served) == 2:
                    break
            assert served == {c.peer_ids["b"], c.peer_ids["c"]}
            descriptors = [await peer.rpc.call(p, "getDescriptor") for p in (a, b)]
    for desc in descriptors:
        assert desc["addrs"] and not any("/127.0.0.1/" in x or "/ip6/::1/" in x
                                         for x in desc["addrs"]), desc["addrs"]


async def settle(c: Cluster, peer: ClientPeer, gateway: str) -> None:
    """Until the gateway holds no ticket or unflushed usage and every node
    holds the same events."""
    with trio.fail_after(60):
        while True:
            h = await peer.rpc.call(gateway, "getServiceHealth", {})
            if h["quota"]["tickets_held"] == 0 and h["usage_pending"] == 0 \
                    and h["in_flight"] == 0:
                break
            await trio.sleep(0.1)
        peers = await connect_all(peer, [c.addr_of(n) for n in c.names])
        await c.observer.wait_converged(peer.rpc, peers)  # type: ignore[attr-defined]


HUB_LAYOUT = {"hub": ["auth", "gateway"], "w1": ["inference"], "w2": ["inference"]}


async def test_the_hub_restarted_and_killed_under_load_gets_its_workers_back(
        tmp_path: Path) -> None:
    """The hub (the only bootstrap, auth and gateway node) is stopped and
    started again, then SIGKILLed and started again, while clients keep
    asking: both workers are routed again within 10 s of the hub serving
    each time; requests meanwhile fail with a clear error; every answered
    request is in the ledger with its tokens, on every node."""
    tables = {"gateway": OPEN, "models": [synthetic(tokens=8, token_delay=0.01)]}
    outcomes: list[Outcome] = []
    recovery: list[float] = []
    with trio.fail_after(240):
        async with cluster(tmp_path, HUB_LAYOUT, tables) as (c, peer):
            hub_addr = c.addr_of("hub")
            (hub,) = await connect_all(peer, [hub_addr])
            user = await register_user(peer.rpc, hub, "hana")
            key = user["api_key"]
            await wait_workers(peer, hub, key, 2)

            async def client(n: int) -> None:
                i = 0
                while True:
                    out = await ask(peer.rpc, hub, key, f"client {n} question {i}", limit=30)
                    outcomes.append(out)
                    i += 1
                    if not out.ok:
                        await trio.sleep(0.2)
                        with contextlib.suppress(errors.P2PInferError):
                            await peer.rpc.connect(hub_addr)

            async with trio.open_nursery() as load:
                for n in range(4):
                    load.start_soon(client, n)
                for how in ("stop", "kill"):
                    await trio.sleep(2)
                    node = c.nodes["hub"]
                    await trio.to_thread.run_sync(node.stop if how == "stop" else node.kill)
                    await trio.sleep(2)
                    await trio.to_thread.run_sync(node.start)
                    await trio.to_thread.run_sync(node.wait_ready)
                    await connect_all(peer, [hub_addr])
                    recovery.append(await wait_workers(peer, hub, key, 2, limit=20))
                await trio.sleep(2)
                load.cancel_scope.cancel()
            await settle(c, peer, hub)
            codes = await trio.to_thread.run_sync(c.stop_all)
    assert all(code == 0 for code in codes.values()), codes
    ledgers = {n: read_ledger(c.nodes[n].db) for n in c.names}
    kinds = Counter(o.kind for o in outcomes)
    record("hub-restarted", {"recovery_s": recovery, "outcomes": dict(kinds)})
    assert max(recovery) <= 10, recovery
    assert set(kinds) <= {"ok", "PeerUnavailable", "StreamBroken", "NoWorkerAvailable",
                          "Cancelled"}, kinds
    assert kinds["ok"] > 50 and sum(kinds.values()) > kinds["ok"], kinds
    first = ledgers["hub"]
    for name, lf in ledgers.items():
        assert lf.integrity == "ok" and lf.held == 0, name
        assert lf.events == first.events, f"{name} differs from the hub"
    merged = swarm_logs(ledgers.values())
    for o in outcomes:
        if o.ok:  # answered: logged once, with the tokens the client was told
            assert merged.logs.get(request_hash(o.prompt)) == [("success", o.tokens)], o.prompt
    ok_tokens = sum(o.tokens for o in outcomes if o.ok)
    requests, tokens = merged.logged[user["user_id"]]
    assert requests >= kinds["ok"] and tokens >= ok_tokens
    # anything logged beyond the answers went down with the hub mid-request
    assert requests - kinds["ok"] <= sum(v for k, v in kinds.items() if k != "ok")
    for name, lf in ledgers.items():
        assert lf.usage_of(user["user_id"]) == (requests, tokens), name


async def test_a_worker_whose_address_changes_is_routed_again(tmp_path: Path) -> None:
    """A worker's machine gets a new IP address (its old one gone) while it
    serves: within 30 s the hub routes to it again, at the new address."""
    tables = {"gateway": OPEN, "models": [synthetic(tokens=4)]}
    with trio.fail_after(180):
        async with cluster(tmp_path, HUB_LAYOUT, tables) as (c, peer):
            (hub,) = await connect_all(peer, [c.addr_of("hub")])
            user = await register_user(peer.rpc, hub, "ivan")
            await wait_workers(peer, hub, user["api_key"], 2)
            w1 = c.peer_ids["w1"]
            new_ip = c.topology.readdress(c.index("w1"), 111)  # type: ignore[union-attr]
            moved_at = trio.current_time()
            served_at = None
            i = 0
            while served_at is None:
                out = await ask(peer.rpc, hub, user["api_key"], f"after the move {i}", limit=30)
                i += 1
                if out.ok and out.trailer["worker"] == w1:
                    served_at = trio.current_time()
                else:
                    await trio.sleep(0.05)
            # and the hub names it at its new address, to lookups as well
            # (while the hub swaps its connections to the worker, one lookup
            # may miss it: the next one must not)
            await c.observer.version_vector(peer.rpc, hub)  # type: ignore[attr-defined]
            where = [f"/ip4/{new_ip}/tcp/4001/p2p/{w1}"]
            seen: list[Any] = []
            with trio.move_on_after(max(1.0, moved_at + 30 - trio.current_time())):
                while True:
                    found = await peer.rpc.call(hub, "findPeers", {"model": "fake"})
                    seen = [d["addrs"] for d in found if d["peer_id"] == w1]
                    if seen == [where]:
                        break
                    await trio.sleep(0.1)
            listed_at = trio.current_time()
    took = served_at - moved_at
    record("worker-readdressed", {"routed_again_s": took, "requests": i,
                                  "listed_again_s": listed_at - moved_at})
    assert took <= 30, took
    assert seen == [where], seen


async def test_the_hub_readdressed_redials_the_workers_it_remembers(tmp_path: Path) -> None:
    """The hub's address changes under it, so the workers' bootstrap address
    points nowhere: the hub dials them itself, at the addresses it stored
    when they connected, and routes to both again within 30 s."""
    tables = {"gateway": OPEN, "models": [synthetic(tokens=4)]}
    with trio.fail_after(180):
        async with cluster(tmp_path, HUB_LAYOUT, tables) as (c, peer):
            (hub,) = await connect_all(peer, [c.addr_of("hub")])
            user = await register_user(peer.rpc, hub, "hugo")
            await wait_workers(peer, hub, user["api_key"], 2)
            await trio.sleep(1)  # the workers' descriptors are in the hub's store
            c.topology.readdress(c.index("hub"), 110)  # type: ignore[union-attr]
            moved_at = trio.current_time()
            served: set[str] = set()
            failed: Counter[str] = Counter()
            i = 0
            # a new client, given the hub's new address (this one's connection
            # died with the old address)
            async with client_peer() as fresh:
                await connect_all(fresh, [c.addr_of("hub")])
                with trio.move_on_after(60):
                    while len(served) < 2:
                        out = await ask(fresh.rpc, hub, user["api_key"], f"moved hub {i}",
                                        limit=30)
                        i += 1
                        if out.ok:
                            served.add(out.trailer["worker"])
                        else:
                            failed[f"{out.kind}: {out.error}"] += 1
                            await trio.sleep(0.05)
            took = trio.current_time() - moved_at
    assert len(served) == 2, failed
    record("hub-readdressed", {"both_workers_routed_s": took, "requests": i})
    assert served == {c.peer_ids["w1"], c.peer_ids["w2"]}
    assert took <= 30, took


async def test_the_only_auth_node_restored_from_a_backup_serves_logins_at_once(
        tmp_path: Path) -> None:
    """The hub (the only auth node, the one every worker bootstraps from) is
    restored from a backup taken before a second user registered, and
    started while the workers run: the restore fence lifts as soon as the
    workers, which redial it, report its events, and logins work within
    10 s of it starting (the fence used to wait for peers that never came
    back, refusing every login for minutes)."""
    from p2pinfer.ledger.backup import backup, restore

    tables = {"gateway": OPEN, "models": [synthetic(tokens=4)]}
    with trio.fail_after(180):
        async with cluster(tmp_path, HUB_LAYOUT, tables) as (c, peer):
            hub_addr = c.addr_of("hub")
            (hub,) = await connect_all(peer, [hub_addr])
            await register_user(peer.rpc, hub, "rosa")
            await wait_workers(peer, hub, (await register_user(peer.rpc, hub, "rita"))
                               ["api_key"], 2)
            network = c.observer.network_id  # type: ignore[attr-defined]
            saved = tmp_path / "hub-backup.db"
            node = c.nodes["hub"]
            await trio.to_thread.run_sync(lambda: backup(node.db, saved, peer_id=hub,
                                                         network_id=network))
            await register_user(peer.rpc, hub, "sami")  # after the backup
            await trio.sleep(2)  # replicated to the workers
            await trio.to_thread.run_sync(node.stop)
            restored = restore(saved, node.db, peer_id=hub, network_id=network)
            assert restored["fence"]
            await trio.to_thread.run_sync(node.start)
            await trio.to_thread.run_sync(node.wait_ready)
            started = trio.current_time()
            await connect_all(peer, [hub_addr])
            logged_in: dict[str, float] = {}
            with trio.move_on_after(30):
                while len(logged_in) < 2:
                    for name in ("rosa", "sami"):
                        if name in logged_in:
                            continue
                        try:
                            await peer.rpc.call(hub, "loginUser",
                                                {"username": name, "password": PASSWORD})
                        except errors.P2PInferError:
                            continue
                        logged_in[name] = trio.current_time() - started
                    await trio.sleep(0.1)
    record("auth-restored", {"login_after_start_s": logged_in})
    assert set(logged_in) == {"rosa", "sami"}, logged_in
    assert max(logged_in.values()) <= 10, logged_in
