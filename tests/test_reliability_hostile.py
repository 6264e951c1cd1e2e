"""Hostile input against a real node with every role (issue 10).

Each test is one kind of attack with its expected outcome:

- random params (hypothesis) to every RPC method of every role, from a
  member and from a stranger: a result or a P2PInferError with its code,
  never HandlerError, never a hang, and the node keeps serving;
- hostile frame sequences on a live RPC stream: each bad frame gets its own
  error and the stream stays usable;
- member-only methods from a non-member and from a removed member: NotMember,
  and the handler never runs;
- forged and replayed ledger events served through anti-entropy by a
  hostile member: each refused and counted, nothing changes;
- API key guessing: the comparison takes the same time wherever the guess
  differs, and a guessing address is throttled while others are not;
- oversized prompts and frames: a specific error, the node unharmed;
- slow-loris over HTTP (bodies, headers, idle connections) and over libp2p
  (idle streams from one peer).

Hypothesis generates the inputs (a fixed seed, so a run is reproducible);
examples are drawn up front and sent to one long-lived node, since a node
cannot be restarted for each example.
"""

from __future__ import annotations

import hmac
import logging
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from p2pinfer import errors, wire
from p2pinfer.credentials import apikeys
from p2pinfer.identity import Identity
from p2pinfer.rpc import RPC_PROTOCOL, RpcClient, make_host

from .chaos_harness import record
from .helpers import join_network, make_network, node_config, run_nodes, wait_for
from .test_reliability_rpc import ATTACKER_IP, LOOPBACK, attacker_host
from .test_web_support import PASSWORD, web_tables

ROLES = ["auth", "gateway", "inference", "metrics", "web"]
MAX_FRAME = 64 * 1024


def draw(strategy: st.SearchStrategy[Any], n: int, seed: int) -> list[Any]:
    """``n`` examples of ``strategy``, reproducibly (no shrinking needed:
    the examples are judged later, against a running node)."""
    out: list[Any] = []

    @settings(max_examples=n, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), deadline=None)
    @given(strategy)
    def collect(example: Any) -> None:
        out.append(example)

    collect.hypothesis.inner_test._hypothesis_internal_use_seed = seed  # type: ignore[attr-defined]
    collect()
    return out[:n]


@dataclass
class Target:
    node: Any
    user: dict[str, str]

    @property
    def addr(self) -> str:
        return str(self.node.addrs[0])


@pytest.fixture
async def target(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Target]:
    """One node with every role (synthetic model, small frames, fast argon2)
    and a user with a session and a key."""
    (home,) = make_network(tmp_path, 1, roles=ROLES)
    tables = web_tables(metrics={"prometheus_port": 0}, web={"body_timeout": 2},
                        gateway={"default_rate_limit": 10**6, "concurrent_per_key": 0,
                                 "concurrent_per_user": 0})
    cfg = node_config(home, roles=ROLES, tables=tables, max_frame=MAX_FRAME)
    async with run_nodes(nursery, [cfg]) as (node,):
        with trio.fail_after(60):
            await node.roles["inference"].engine.wait_settled()
            me = node.peer_id
            await node.rpc.call(me, "registerUser", {"username": "alice", "password": PASSWORD,
                                                     "email": "alice@example.com"})
            session = await node.rpc.call(me, "loginUser", {"username": "alice",
                                                            "password": PASSWORD})
            key = await node.rpc.call(me, "generateApiKey", {"token": session["token"]})
        yield Target(node, {"user_id": session["user"]["user_id"], "token": session["token"],
                            "api_key": key["api_key"], "key_id": key["key_id"],
                            "refresh_token": session["refresh_token"]})


@pytest.fixture
async def stranger() -> AsyncIterator[RpcClient]:
    """A peer that is not a network member."""
    host = make_host(Identity.generate())
    async with host.run(listen_addrs=LOOPBACK), RpcClient.open(host) as rpc:
        yield rpc


# -- random params to every method ------------------------------------------------------------
PARAM_KEYS = [
    "auth", "api_key", "apiKey", "token", "request", "prompt", "messages", "model",
    "max_tokens", "temperature", "top_p", "stop", "seed", "system", "modelConfig", "cache",
    "username", "email", "password", "user_id", "userId", "key_id", "keyId", "tier",
    "is_active", "is_admin", "as_operator", "refresh_token", "source", "since", "until",
    "net", "docs", "vv", "digest", "after", "limit", "ticket", "tokens", "limits",
    "requests", "role", "name", "metric", "value", "labels", "confirm", "content",
]


def params_strategy(t: Target) -> st.SearchStrategy[Any]:
    known = st.sampled_from([t.user["api_key"], t.user["token"], t.user["user_id"],
                             t.user["key_id"], t.user["refresh_token"], t.node.peer_id,
                             t.node.network_id, "fake", "premium", "2025-01-01", "alice",
                             "alice@example.com", PASSWORD, ""])
    scalar = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
              | st.floats(allow_nan=True) | st.text(max_size=40) | st.binary(max_size=40)
              | known)
    value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(PARAM_KEYS) | st.text(max_size=6), inner, max_size=4), max_leaves=10)
    key, token = {"api_key": t.user["api_key"]}, {"token": t.user["token"]}
    # valid credentials (and a valid request) under random fields reach past
    # the first checks into each method's own logic
    bases = st.sampled_from([{}, {"auth": key}, {"auth": token}, key, token,
                             {"auth": key, "request": {"prompt": "hi", "model": "fake"}},
                             {"net": t.node.network_id, "docs": []}])
    fields = st.dictionaries(st.sampled_from(PARAM_KEYS), value, max_size=5)
    return value | fields | st.builds(lambda base, extra: {**base, **extra}, bases, fields)


def templates(t: Target) -> dict[str, dict[str, Any]]:
    """A well-formed call per method (none that destroys the test's own user),
    for the mutational half of the fuzzer."""
    key, token, user = t.user["api_key"], t.user["token"], t.user["user_id"]
    other = "2c4a8f1e-0b7e-4f51-9b0e-3d5c0b7e4f51"
    return {
        "processInferenceRequest": {"auth": {"api_key": key},
                                    "request": {"prompt": "hi", "model": "fake",
                                                "max_tokens": 4}},
        "getUserQuota": {"auth": {"api_key": key}},
        "getUsage": {"auth": {"api_key": key}, "since": "2025-01-01"},
        "listModels": {"auth": {"api_key": key}},
        "registerUser": {"username": "bob", "email": "bob@example.com", "password": PASSWORD},
        "loginUser": {"username": "alice", "password": PASSWORD},
        "generateApiKey": {"token": token, "name": "fuzz"},
        "validateApiKey": {"api_key": key},
        "listApiKeys": {"token": token},
        "revokeApiKey": {"token": token, "key_id": other},
        "getUserUsage": {"token": token},
        "getUser": {"token": token},
        "setUserTier": {"token": token, "user_id": other, "tier": "premium"},
        "exportUserData": {"token": token},
        "findPeers": {"role": "gateway"},
        "ledgerHello": {"net": t.node.network_id, "docs": []},
        "ledgerSync": {"vv": {}, "digest": b""},
        "ledgerPull": {"after": {t.node.peer_id: 0}, "limit": 5},
        "processPrompt": {"prompt": "hi", "model": "fake", "max_tokens": 4},
        "quota.acquire": {"user_id": user, "key_id": other, "limits": {"requests": 10**6}},
        "quota.usage": {"user_id": user},
        "recordMetric": {"name": "ai_platform_requests_total", "value": 1},
    }


def mutation_strategy(t: Target) -> st.SearchStrategy[tuple[str, Any]]:
    """(method, params): a template with one field set to a random value or
    removed."""
    base = templates(t)
    value = params_strategy(t)

    def mutate(method: str, field: str, new: Any, drop: bool) -> tuple[str, Any]:
        params = dict(base[method])
        if drop:
            params.pop(field, None)
        else:
            params[field] = new
        return method, params

    return st.sampled_from(sorted(base)).flatmap(lambda m: st.builds(
        mutate, st.just(m), st.sampled_from(sorted(base[m])) | st.sampled_from(PARAM_KEYS),
        value, st.booleans()))


async def call_any(rpc: Any, peer: str, method: Any, params: Any) -> Any:
    if method.streaming:
        items = []
        async with rpc.stream(peer, method.name, params) as s:
            async for item in s:
                items.append(item)
                if len(items) > 50:
                    break
        return items
    return await rpc.call(peer, method.name, params)


async def test_random_params_to_every_rpc_method(target: Target, stranger: RpcClient,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """30 random params per method plus 600 mutated well-formed calls, from
    the node itself (a member) and
    from a stranger over Noise: an answer or a coded P2PInferError, never a
    HandlerError (an unhandled exception) and never a hang."""
    node = target.node
    methods = sorted(node.rpc_server.methods.values(), key=lambda m: m.name)
    assert len(methods) >= 30  # every role's methods are registered
    by_name = {m.name: m for m in methods}
    random_calls = [(methods[i % len(methods)], params) for i, params in
                    enumerate(draw(params_strategy(target), 30 * len(methods), seed=10))]
    mutated = [(by_name[name], params)
               for name, params in draw(mutation_strategy(target), 600, seed=12)]
    peer = await stranger.connect(target.addr)
    outcomes: Counter[str] = Counter()
    bad: list[str] = []
    with trio.fail_after(240):
        for method, params in random_calls + mutated:
            for who, rpc, dest in (("member", node.rpc, node.peer_id),
                                   ("stranger", stranger, peer)):
                try:
                    with trio.fail_after(15):
                        await call_any(rpc, dest, method, params)
                    outcomes["ok"] += 1
                except errors.HandlerError as exc:
                    bad.append(f"{who} {method.name}({params!r:.200}): {exc}")
                except errors.P2PInferError as exc:
                    assert type(exc) is not errors.P2PInferError and exc.code > 1
                    outcomes[type(exc).__name__] += 1
                except trio.TooSlowError:
                    bad.append(f"{who} {method.name}({params!r:.200}) hung")
    record("hostile-rpc-fuzz", {"methods": len(methods), "calls": 2 * len(random_calls + mutated),
                                "outcomes": dict(outcomes), "handler_errors_or_hangs": bad})
    assert not bad, bad[:5]
    assert not [r for r in caplog.records if r.name == "p2pinfer.rpc.server"
                and r.levelno >= logging.ERROR], "a handler raised"
    assert outcomes["ok"] > 50 and outcomes["InvalidParams"] > 100, outcomes
    assert outcomes["NotMember"] > 0  # the stranger met the member-only methods
    # and the node still serves everyone
    assert (await stranger.call(peer, "ping"))["peer_id"] == node.peer_id
    assert node.ledger.store.integrity_check() == "ok"


# -- hostile frames on a live stream ----------------------------------------------------------
def frame_strategy() -> st.SearchStrategy[bytes]:
    scalar = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20)
    fields = st.lists(scalar | st.dictionaries(st.text(max_size=5), scalar, max_size=3),
                      max_size=8)
    structured = st.builds(lambda v, k, i, rest: msgpack.packb([v, k, i, *rest]),
                           st.sampled_from([1, 1, 0, 2, -1, "1"]), st.integers(-1, 9),
                           st.integers(-5, 2**64 - 1), fields)
    body = structured | st.binary(max_size=200)
    framed = body.map(lambda b: len(b).to_bytes(4, "big") + b)
    oversized = st.integers(MAX_FRAME + 1, 3 * MAX_FRAME).map(
        lambda n: n.to_bytes(4, "big") + b"\0" * n)
    return framed | oversized | st.sampled_from([
        (2**32 - 1).to_bytes(4, "big")[:0],  # nothing
        msgpack.packb([1, 1, 7, "ping", None, None, {}])[:5],  # a torn frame, unframed
    ]).map(lambda b: len(b).to_bytes(4, "big") + b)


async def test_hostile_frame_sequences_keep_the_stream_usable(
        target: Target, stranger: RpcClient) -> None:
    from libp2p.peer.id import ID

    sequences = draw(st.lists(frame_strategy(), min_size=1, max_size=6), 60, seed=11)
    peer = ID.from_base58(await stranger.connect(target.addr))
    with trio.fail_after(120):
        for n, frames in enumerate(sequences):
            stream = await stranger.host.new_stream(peer, [RPC_PROTOCOL])
            try:
                for raw in frames:
                    await stream.write(raw)
                probe_id = 2**40 + n
                await stream.write(wire.encode(wire.Request(probe_id, "ping", None, 10.0, {}),
                                               max_frame=MAX_FRAME))
                decoder = wire.FrameDecoder(MAX_FRAME)
                answered = False
                while not answered:
                    data = await stream.read(65536)
                    assert data, f"stream closed on {frames!r:.300}"
                    for msg in decoder.feed(data):
                        assert not isinstance(msg, wire.DecodeError), msg
                        if isinstance(msg, wire.Error):
                            assert errors.error_class_for_code(msg.code) is not \
                                errors.HandlerError, msg
                        if getattr(msg, "id", None) == probe_id:
                            assert isinstance(msg, wire.Response), msg
                            answered = True
            finally:
                await stream.close()
    assert target.node.rpc_server.stats.decode_errors > 0


# -- member-only methods --------------------------------------------------------------------
async def test_member_only_methods_refuse_strangers_and_removed_members(
        tmp_path: Path, target: Target, stranger: RpcClient) -> None:
    from p2pinfer.ledger import load_owner

    node = target.node
    member_only = sorted(m.name for m in node.rpc_server.methods.values()
                         if m.access.value == "member")
    assert {"ledgerSync", "ledgerPull", "processPrompt", "quota.acquire"} <= set(member_only)
    ran: list[str] = []
    node.rpc_server.observers.append(lambda method, status, s: ran.append(status))
    peer = await stranger.connect(target.addr)
    with trio.fail_after(60):
        for name in member_only:
            with pytest.raises(errors.NotMember):
                await call_any(stranger, peer, node.rpc_server.methods[name], {})
        assert set(ran) == {"denied"}
        # a member that the owner removes is refused as soon as the removal lands
        home = tmp_path / "ex-member"
        ex_id = join_network(node.config.home, home, ["gateway"])
        owner = load_owner(node.config.home)
        assert owner is not None
        ex = Identity.load_or_create(home)
        host = make_host(ex)
        async with host.run(listen_addrs=LOOPBACK), RpcClient.open(host) as rpc:
            remote = await rpc.connect(target.addr)
            from p2pinfer.ledger.membership import load_member_cert

            cert = load_member_cert(home)
            assert cert is not None
            await rpc.call(remote, "ledgerHello", {"net": node.network_id,
                                                   "docs": [cert.to_wire()]})
            assert "vv" in await rpc.call(remote, "ledgerSync", {"vv": {}, "digest": b""})
            node.ledger.remove_member(owner, ex_id)
            with pytest.raises(errors.NotMember):
                await rpc.call(remote, "ledgerSync", {"vv": {}, "digest": b""})


# -- forged and replayed events through anti-entropy ------------------------------------------
async def test_forged_and_replayed_events_served_by_a_member_are_refused(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """A member (a worker) turned hostile answers ledgerPull with forgeries:
    the victim refuses each, counts it by reason, and its tables do not
    change (gossip forgeries are covered in test_ledger_replication)."""
    from p2pinfer.ledger.events import sign_event
    from p2pinfer.wire import canonical_pack, unpack

    homes = make_network(tmp_path, ["victim", "rogue"], roles=[["auth", "gateway"],
                                                                ["inference"]])
    cfgs = [node_config(homes[0], roles=[], tables={"ledger": {"sync_interval": 0.3,
                                                               "gossip": False}}),
            node_config(homes[1], roles=[], tables={"ledger": {"sync_interval": 0.3,
                                                               "gossip": False}})]
    async with run_nodes(nursery, cfgs) as (victim, rogue):
        with trio.fail_after(60):
            await rogue.connect(victim.addrs[0])
            await wait_for(lambda: victim.ledger.is_member(rogue.peer_id)
                           and victim.ledger.covers(rogue.ledger.version_vector()), limit=20)
            before = victim.ledger.store.snapshot()
            net, me = victim.network_id, rogue.identity
            head = rogue.ledger.store.heads[rogue.peer_id]
            now = rogue.ledger.store.clock.now()
            audit = {"actor": "x", "action": "y", "outcome": "ok", "time": time.time()}
            usage = {"entries": [{"user_id": "2c4a8f1e-0b7e-4f51-9b0e-3d5c0b7e4f51",
                                  "key_id": None, "hour": 0, "requests": 10**6,
                                  "tokens": 10**9}]}
            own = sign_event(me, net, head + 1, now, "usage", usage).raw  # kind not allowed
            fields = unpack(sign_event(me, net, head + 1, now, "member.admitted",
                                       {"cert": rogue.ledger.own_cert.to_wire()}).raw)
            forged = canonical_pack([*fields[:2], victim.peer_id, *fields[3:]])  # not its author
            old = victim.ledger.store.read_range(rogue.peer_id, 0, 1)[0]  # exact duplicate
            replay = sign_event(me, net, 1, now, "member.admitted",  # seq 1, other content
                                {"cert": rogue.ledger.own_cert.to_wire()}).raw
            elsewhere = sign_event(me, "p2p-elsewhere", head + 1, now, "audit", audit).raw
            garbage = b"\x93\x01\x02"
            served = [own, forged, old, replay, elsewhere, garbage]

            async def hostile_pull(ctx: Any, params: Any) -> Any:
                yield served

            rogue.rpc_server.methods["ledgerPull"].func = hostile_pull
            # claim to be far ahead so the victim pulls
            original_sync = rogue.rpc_server.methods["ledgerSync"].func

            async def boastful_sync(ctx: Any, params: Any) -> Any:
                out = dict(await original_sync(ctx, params))
                out["vv"] = {**out["vv"], rogue.peer_id: head + 5}
                return out

            rogue.rpc_server.methods["ledgerSync"].func = boastful_sync
            metrics = victim.ledger.metrics
            reasons = ("kind_not_allowed", "bad_signature", "replayed", "wrong_network")
            start = {r: metrics.rejected_count(r) for r in reasons}
            victim.ledger.request_sync(rogue.peer_id)
            try:
                await wait_for(lambda: all(metrics.rejected_count(r) > start[r]
                                           for r in reasons), limit=20)
            except trio.TooSlowError:
                raise AssertionError({r: metrics.rejected_count(r) for r in
                                      (*reasons, "malformed", "not_member")}) from None
            assert victim.ledger.store.snapshot() == before
            assert victim.ledger.store.integrity_check() == "ok"
            assert victim.ledger.store.heads[rogue.peer_id] == head
            assert victim.ledger.usage(user_id=usage["entries"][0]["user_id"]) == []


# -- API key guessing ---------------------------------------------------------------------
def _median_ns(fn: Any, a: Any, b: Any, batch: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(batch):
        fn(a, b)
    return (time.perf_counter_ns() - t0) / batch


def timing_gap(compare: Any, key: str, stored_near: str, stored_far: str,
               rounds: int = 300, batch: int = 50) -> float:
    """Relative difference of the median time of ``compare(key, near)`` and
    ``compare(key, far)``, measured interleaved."""
    near, far = [], []
    for _ in range(rounds):
        near.append(_median_ns(compare, key, stored_near, batch))
        far.append(_median_ns(compare, key, stored_far, batch))
    return abs(statistics.median(near) - statistics.median(far)) / statistics.median(far)


def test_api_key_comparison_takes_the_same_time_wherever_a_guess_differs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The stored hash differs from the guess's hash either in its last
    character (70 equal characters first) or in its first: the check takes
    the same time within noise. The same measurement with an early-exit
    comparison (a positive control) shows the difference at once."""
    key = apikeys.generate_key().key
    true = apikeys.hash_key(key)
    flip = {"0": "1"}.get
    near = true[:-1] + (flip(true[-1]) or "0")
    first = len("sha256:")
    far = true[:first] + (flip(true[first]) or "0") + true[first + 1:]
    assert not apikeys.key_matches(key, near) and not apikeys.key_matches(key, far)
    # A leak shows in every measurement; the machine's noise (other processes)
    # now and then in one: measure again, up to three times, before failing.
    gap = timing_gap(apikeys.key_matches, key, near, far)
    for _ in range(2):
        if gap < 0.05:
            break
        gap = min(gap, timing_gap(apikeys.key_matches, key, near, far))

    def early_exit(a: bytes, b: bytes) -> bool:
        if len(a) != len(b):
            return False
        for x, y in zip(a, b, strict=True):
            if x != y:
                return False
        return True

    monkeypatch.setattr(apikeys, "hmac", type("naive", (), {"compare_digest":
                                                           staticmethod(early_exit)}))
    leaky = timing_gap(apikeys.key_matches, key, near, far)
    monkeypatch.setattr(apikeys, "hmac", hmac)
    record("hostile-key-timing", {"relative_gap_compare_digest": round(gap, 4),
                                  "relative_gap_early_exit_control": round(leaky, 4)})
    assert leaky > 0.3, leaky  # the method can see a leak...
    assert gap < 0.05, gap  # ...and the real comparison has none


async def test_api_key_guessing_is_throttled_per_address(target: Target) -> None:
    """From one address, guesses are throttled by what they guess at:
    ``limit`` wrong secrets of a real key id, then that key (the right
    secret included) gets LoginThrottled with retry_after; ``limit``
    unknown keys, then every further unknown key gets it, but not a valid
    key of another id; the node's auth role refuses them alike (one
    throttle per node). A client at another address is served throughout."""
    node = target.node
    limit = node.roles["gateway"].auth.settings.max_failures_per_source
    good = target.user["api_key"]
    public_id = apikeys.parse_key(good)
    assert public_id is not None
    host = attacker_host()
    listen = [__import__("multiaddr").Multiaddr(f"/ip4/{ATTACKER_IP}/tcp/0")]

    async def quota(rpc: RpcClient, gw: str, key: str) -> Any:
        return await rpc.call(gw, "getUserQuota", {"auth": {"api_key": key}})

    async with host.run(listen_addrs=listen), RpcClient.open(host) as rpc:
        gw = await rpc.connect(target.addr)
        with trio.fail_after(60):
            for _ in range(limit):  # unknown keys
                with pytest.raises(errors.InvalidApiKey):
                    await quota(rpc, gw, apikeys.generate_key().key)
            with pytest.raises(errors.LoginThrottled) as ei:
                await quota(rpc, gw, apikeys.generate_key().key)
            assert 0 < ei.value.retry_after <= 900
            # the valid key from the same address is not locked out by them
            assert (await quota(rpc, gw, good))["user_id"] == target.user["user_id"]
            for _ in range(limit):  # wrong secrets of the real key's id
                with pytest.raises(errors.InvalidApiKey):
                    await quota(rpc, gw, f"p2p_{public_id}_{apikeys.generate_key().key[-43:]}")
            with pytest.raises(errors.LoginThrottled):
                await quota(rpc, gw, good)  # the right secret learns nothing now
            # the node's roles share one throttle: the auth role's own
            # validateApiKey refuses the guesser at once too
            with pytest.raises(errors.LoginThrottled):
                await rpc.call(gw, "validateApiKey", {"api_key": apikeys.generate_key().key})
            with pytest.raises(errors.LoginThrottled):
                await rpc.call(gw, "validateApiKey", {"api_key": good})
        # the rightful user, elsewhere, is not affected
        answer = await node.rpc.call(node.peer_id, "getUserQuota", {"auth": {"api_key": good}})
        assert answer["user_id"] == target.user["user_id"]


# -- oversized input ------------------------------------------------------------------------
def test_an_oversized_frame_is_refused_to_the_call_that_sent_it() -> None:
    """Sans-IO: the frame is skipped unread, yet its error names its call id
    (from the frame's first bytes), so the caller is answered."""
    big = wire.encode(wire.Request(77, "ping", b"x" * 10_000), max_frame=10**6)
    small = wire.encode(wire.Request(78, "ping"), max_frame=4096)
    decoder = wire.FrameDecoder(4096)
    out = decoder.feed(big[:100]) + decoder.feed(big[100:] + small)
    assert isinstance(out[0], wire.DecodeError) and out[0].call_id == 77
    assert isinstance(out[0].error, errors.FrameTooLarge)
    assert isinstance(out[1], wire.Request) and out[1].id == 78  # still in sync


async def test_oversized_prompts_and_frames(target: Target, stranger: RpcClient) -> None:
    from libp2p.peer.id import ID

    node = target.node
    auth = {"api_key": target.user["api_key"]}
    peer = await stranger.connect(target.addr)
    with trio.fail_after(60):
        for chars in (40_000, 60_000):  # the worker's limit is 32,000 characters
            with pytest.raises(errors.InvalidParams) as ei:
                await call_any(stranger, peer, node.rpc_server.methods[
                    "processInferenceRequest"], {"request": {"prompt": "x " * (chars // 2),
                                                             "model": "fake"}, "auth": auth})
            assert ei.value.data.get("field") in ("prompt", "messages")
        # a frame larger than the node accepts: refused before it is read
        with pytest.raises(errors.FrameTooLarge):
            await stranger.call(peer, "ping", {"blob": b"x" * (MAX_FRAME + 1)})
        stream = await stranger.host.new_stream(ID.from_base58(peer), [RPC_PROTOCOL])
        claimed = 2**31
        await stream.write(claimed.to_bytes(4, "big") + b"\0" * 1000)
        decoder = wire.FrameDecoder(MAX_FRAME)
        replies = decoder.feed(await stream.read(65536))
        assert isinstance(replies[0], wire.Error)
        assert replies[0].code == errors.FrameTooLarge.code
        await stream.close()
        health = await stranger.call(peer, "getServiceHealth", {})
        assert health["quota"]["tickets_held"] == 0 and health["in_flight"] == 0
        assert (await stranger.call(peer, "ping"))["peer_id"] == node.peer_id


# -- slow-loris ---------------------------------------------------------------------------
async def test_http_slow_loris(target: Target) -> None:
    """A body sent a byte at a time gets 422 after ``[web] body_timeout``
    (2 s here); 200 idle connections and 20 trickling bodies do not stop a
    normal request from being answered at once."""
    web = target.node.roles["web"]
    port = web.port

    async def trickle() -> tuple[float, bytes]:
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        t0 = trio.current_time()
        await sock.send_all(b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{")
        reply = b""
        with trio.move_on_after(10):
            while True:
                try:
                    with trio.move_on_after(0.5):
                        data = await sock.receive_some(4096)
                        if not data:
                            break
                        reply += data
                    await sock.send_all(b" ")
                except trio.BrokenResourceError:  # closed (a reset: bytes were unread)
                    break
        await sock.aclose()
        return trio.current_time() - t0, reply

    idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(200)]
    try:
        results: list[tuple[float, bytes]] = []
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                async def one() -> None:
                    results.append(await trickle())

                for _ in range(20):
                    nursery.start_soon(one)
                await trio.sleep(0.5)  # the trickles are under way
                async with httpx.AsyncClient(base_url=web.url, timeout=10) as http:
                    t0 = trio.current_time()
                    r = await http.get("/api/health")
                    assert r.status_code == 200
                    assert trio.current_time() - t0 < 2
        for seconds, reply in results:
            assert reply.startswith(b"HTTP/1.1 422"), reply[:100]
            assert b"did not arrive within 2 s" in reply
            assert 1.9 < seconds < 6
    finally:
        for sock in idle:
            await sock.aclose()


@pytest.mark.parametrize("workers", [2, 0], ids=["front_doors", "in_the_node"])
async def test_http_slow_headers_are_cut_by_the_idle_timer(
        tmp_path: Path, nursery: trio.Nursery, workers: int) -> None:
    """Headers sent a byte at a time, a second request's too, and a
    connection that sends nothing: each connection is closed after
    ``[web] idle_timeout`` (30 s by default, 1.5 s here), by front doors
    and inside the node alike, while a normal request is answered."""
    (home,) = make_network(tmp_path, 1, roles=["auth", "web"])
    cfg = node_config(home, roles=["auth", "web"], tables=web_tables(
        models=None, web={"idle_timeout": 1.5, "workers": workers}))
    async with run_nodes(nursery, [cfg]) as (node,):
        port = node.roles["web"].port

        async def closed_after(first: bytes, slow: bytes) -> float | None:
            sock = await trio.open_tcp_stream("127.0.0.1", port)
            if first:  # one whole request first: the second one is slow
                await sock.send_all(first)
                assert (await sock.receive_some(65536)).startswith(b"HTTP/1.1 200")
            t0 = trio.current_time()
            try:
                with trio.fail_after(20):
                    for byte in slow or b"\0" * 100:
                        if slow:
                            await sock.send_all(bytes([byte]))
                        with trio.move_on_after(0.2):
                            if await sock.receive_some(1024) == b"":
                                return trio.current_time() - t0
                return None
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return trio.current_time() - t0
            finally:
                await sock.aclose()

        request = b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n"
        slow = b"GET /api/version HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        results: dict[str, float | None] = {}

        async def measure(name: str, first: bytes, trickle: bytes) -> None:
            results[name] = await closed_after(first, trickle)

        async with trio.open_nursery() as checks:
            checks.start_soon(measure, "slow headers", b"", slow)
            checks.start_soon(measure, "slow second request", request, slow)
            checks.start_soon(measure, "silent", b"", b"")
            await trio.sleep(0.5)
            async with httpx.AsyncClient(base_url=node.roles["web"].url, timeout=5) as http:
                assert (await http.get("/api/version")).status_code == 200
        for name, seconds in results.items():
            assert seconds is not None and 1.3 < seconds < 4, (name, seconds)


async def test_idle_libp2p_streams_from_one_peer(target: Target, stranger: RpcClient) -> None:
    """One peer opens its RPC stream limit and more, and 200 raw streams
    that never negotiate a protocol: the extra RPC stream is refused with
    TooManyStreams, and another peer is served at once throughout."""
    from libp2p.peer.id import ID

    node = target.node
    peer = await stranger.connect(target.addr)
    pid = ID.from_base58(peer)
    limit = node.config.max_streams_per_peer
    with trio.fail_after(60):
        await stranger.call(peer, "ping")  # the client's own channel is open
        rpc_streams = [await stranger.host.new_stream(pid, [RPC_PROTOCOL])
                       for _ in range(limit - 1)]  # the client's own channel is one more
        extra = await stranger.host.new_stream(pid, [RPC_PROTOCOL])
        reply = wire.FrameDecoder(MAX_FRAME).feed(await extra.read(65536))
        assert isinstance(reply[0], wire.Error) and reply[0].code == errors.TooManyStreams.code
        conn = stranger.host.get_network().get_connections(pid)[0]
        raw = [await conn.muxed_conn.open_stream() for _ in range(200)]
        host = make_host(Identity.generate())
        async with host.run(listen_addrs=LOOPBACK), RpcClient.open(host) as other:
            other_peer = await other.connect(target.addr)
            t0 = trio.current_time()
            assert (await other.call(other_peer, "ping"))["peer_id"] == node.peer_id
            assert trio.current_time() - t0 < 2
        for s in [*rpc_streams, extra, *raw]:
            await s.reset()
    # the node counted the refusal and still serves the greedy peer's channel
    assert node.rpc_server.stats.rejected_streams >= 1
    assert (await stranger.call(peer, "ping"))["peer_id"] == node.peer_id


# -- the HTTP API with hostile credentials, from its OpenAPI document -------------------------
def header_strategy(t: Target) -> st.SearchStrategy[dict[str, str]]:
    """Credentials a guesser or a broken client would send (test_web_fuzz runs
    Schemathesis with valid ones)."""
    junk = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80)
    key = t.user["api_key"]
    values = junk | st.sampled_from([
        key, key[:-1], key + "x", "p2p_", f"p2p_{'a' * 12}_{'b' * 43}", "Bearer", "Basic !!!",
        "Basic " + "A" * 5000, t.user["token"][:-2], t.user["token"] + ".x", "x" * 5000])
    name = st.sampled_from(["X-API-Key", "Authorization", "Authorization", "Cookie"])
    prefix = st.sampled_from(["", "Bearer ", "Basic ", "bearer  "])
    return st.dictionaries(name, st.builds(lambda p, v: (p + v)[:6000].strip() or "x",
                                           prefix, values),
                           max_size=2)


def body_strategy() -> st.SearchStrategy[Any]:
    scalar = st.none() | st.booleans() | st.integers() \
        | st.floats(allow_nan=False, allow_infinity=False) \
        | st.text(max_size=30)
    value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["prompt", "model", "messages", "stream", "max_tokens", "username",
                         "password", "email", "name", "role", "content", "refresh_token"])
        | st.text(max_size=6), inner, max_size=4), max_leaves=8)
    return st.dictionaries(st.sampled_from(["prompt", "model", "messages", "stream",
                                            "max_tokens", "username", "password", "email",
                                            "name", "refresh_token", "options"]),
                           value, max_size=5) | value


async def test_every_http_operation_with_hostile_credentials(target: Target) -> None:
    """Every operation of /openapi.json, with generated bodies and forged,
    truncated, oversized or malformed credentials: never a 5xx, always the
    JSON error shape for API routes, and the rightful user is served after."""
    web = target.node.roles["web"]
    examples = draw(st.tuples(header_strategy(target), body_strategy()), 400, seed=13)
    async with httpx.AsyncClient(base_url=web.url, timeout=30) as http:
        doc = (await http.get("/openapi.json")).json()
        operations = [(method.upper(), path) for path, ops in doc["paths"].items()
                      for method in ops if method in ("get", "post", "delete", "put")
                      and path not in ("/api/auth/logout", "/api/auth/me",
                                       "/api/auth/users/{user_id}")]
        assert len(operations) >= 20
        statuses: Counter[int] = Counter()
        with trio.fail_after(180):
            for i, (headers, body) in enumerate(examples):
                method, path = operations[i % len(operations)]
                url = path.replace("{key_id}", "nope").replace("{user_id}", "nope")
                r = await http.request(method, url, headers=headers,
                                       json=body if method in ("POST", "PUT") else None)
                statuses[r.status_code] += 1
                assert r.status_code < 500, (method, url, headers, body, r.text[:300])
                if url.startswith(("/api/", "/v1/")) and r.status_code >= 400:
                    assert "json" in r.headers.get("content-type", ""), (url, r.text[:200])
        record("hostile-http", {"requests": sum(statuses.values()),
                                "operations": len(operations), "statuses": dict(statuses)})
        assert statuses[401] > 50, statuses
        r = await http.get("/api/quota", headers={"X-API-Key": target.user["api_key"]})
        assert r.status_code == 200, r.text
