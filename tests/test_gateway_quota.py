"""The quota coordinator's bookkeeping (sans-IO, no sockets), and its client side
against a stand-in coordinator."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pinfer import errors
from p2pinfer.gateway.quota import WINDOW_SECONDS, Limits, QuotaBook, rendezvous_order
from p2pinfer.testing import FakeContext

T0 = 1_800_000_000.0  # a fixed moment, 20 min into an hour
T0 = T0 - T0 % WINDOW_SECONDS + 1200


def test_admits_exactly_the_limit_then_says_when_to_retry() -> None:
    book = QuotaBook()
    limits = Limits(requests_per_window=5)
    for i in range(5):
        book.release(book.acquire("u", "k", limits, holder="g", now=T0 + i).id)
    with pytest.raises(errors.RateLimited) as ei:
        book.acquire("u", "k", limits, holder="g", now=T0 + 10)
    assert ei.value.data["scope"] == "user" and ei.value.data["limit"] == 5
    assert ei.value.retry_after == WINDOW_SECONDS - 1200 - 10
    # next hour: a fresh window
    book.acquire("u", "k", limits, holder="g", now=T0 + WINDOW_SECONDS)


def test_key_limit_token_quota_and_concurrency() -> None:
    book = QuotaBook()
    limits = Limits(requests_per_window=100, key_requests_per_window=2,
                    tokens_per_window=50, concurrent_per_key=1)
    t = book.acquire("u", "k1", limits, holder="g", now=T0)
    with pytest.raises(errors.ConcurrencyLimited) as ei:
        book.acquire("u", "k1", limits, holder="g", now=T0)
    assert ei.value.retry_after == 1.0
    book.release(t.id, tokens=20)
    book.release(book.acquire("u", "k1", limits, holder="g", now=T0).id, tokens=10)
    with pytest.raises(errors.RateLimited) as rl:  # key k1 used its 2
        book.acquire("u", "k1", limits, holder="g", now=T0)
    assert rl.value.data["scope"] == "key"
    book.release(book.acquire("u", "k2", limits, holder="g", now=T0).id, tokens=25)
    with pytest.raises(errors.QuotaExceeded):  # 55 tokens >= 50
        book.acquire("u", "k3", limits, holder="g", now=T0)
    assert book.usage("u", now=T0)["tokens"] == 55


def test_requests_in_flight_per_user_count_every_key_and_session() -> None:
    book = QuotaBook()
    limits = Limits(requests_per_window=100, concurrent_per_key=2, concurrent_per_user=3)
    held = [book.acquire("u", key, limits, holder="g", now=T0) for key in ("k1", "k1", "k2")]
    with pytest.raises(errors.ConcurrencyLimited) as ei:  # k2 has room, the user not
        book.acquire("u", "k2", limits, holder="g", now=T0)
    assert ei.value.data["scope"] == "user" and ei.value.data["limit"] == 3
    book.acquire("v", "k3", limits, holder="g", now=T0)  # another user is not affected
    book.release(held[0].id)
    book.acquire("u", "session-u", limits, holder="g", now=T0)
    assert book.user_in_flight == {"u": 3, "v": 1}
    assert Limits.from_wire(limits.to_wire()) == limits


def test_slots_come_back_on_release_holder_and_expiry() -> None:
    book = QuotaBook()
    limits = Limits(requests_per_window=100, concurrent_per_key=2)
    book.acquire("u", "k", limits, holder="gw-a", now=T0)
    book.acquire("u", "k", limits, holder="gw-b", now=T0, ttl=5)
    with pytest.raises(errors.ConcurrencyLimited):
        book.acquire("u", "k", limits, holder="gw-a", now=T0)
    assert book.release_holder("gw-a") == 1
    book.acquire("u", "k", limits, holder="gw-a", now=T0 + 1)
    # gw-b's ticket expires
    assert book.expire(T0 + 6) == 1
    book.acquire("u", "k", limits, holder="gw-a", now=T0 + 6)
    assert book.held() == 2
    assert not book.release("no-such-ticket")


def test_seed_counts_what_other_coordinators_admitted() -> None:
    seen = []

    def seed(user: str, window: int) -> tuple[int, int]:
        seen.append((user, window))
        return (4, 100)

    book = QuotaBook(seed=seed)
    book.acquire("u", "k", Limits(requests_per_window=5), holder="g", now=T0)
    with pytest.raises(errors.RateLimited):
        book.acquire("u", "k", Limits(requests_per_window=5), holder="g", now=T0)
    assert seen == [("u", QuotaBook.window_of(T0))]


def test_limits_from_wire_validates() -> None:
    assert Limits.from_wire(Limits(3, 2, 1, 1).to_wire()) == Limits(3, 2, 1, 1)
    for bad in (None, {}, {"requests": -1}, {"requests": "10"}, {"requests": 1, "tokens": 1.5}):
        with pytest.raises(errors.InvalidParams):
            Limits.from_wire(bad)


def test_rendezvous_is_stable_and_spreads() -> None:
    peers = [f"peer{i}" for i in range(3)]
    assert rendezvous_order("user-1", peers) == rendezvous_order("user-1", list(reversed(peers)))
    firsts = {rendezvous_order(f"user-{i}", peers)[0] for i in range(50)}
    assert firsts == set(peers)
    # removing a gateway moves only its own users
    for i in range(50):
        order = rendezvous_order(f"user-{i}", peers)
        if order[0] != "peer2":
            assert rendezvous_order(f"user-{i}", peers[:2])[0] == order[0]


ops = st.lists(st.tuples(st.sampled_from(["acq", "rel", "drop"]), st.integers(0, 3),
                         st.integers(0, 50)), max_size=120)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_never_over_the_limit_and_slots_never_leak(seq: list[tuple[str, int, int]]) -> None:
    book = QuotaBook()
    limits = Limits(requests_per_window=10, concurrent_per_key=3, tokens_per_window=None)
    held: list[str] = []
    granted = 0
    for op, key, tokens in seq:
        if op == "acq":
            try:
                held.append(book.acquire("u", f"k{key}", limits, holder=f"g{key % 2}",
                                         now=T0).id)
                granted += 1
            except errors.LimitError:
                pass
        elif op == "rel" and held:
            assert book.release(held.pop(tokens % len(held)), tokens)
        elif op == "drop":
            book.release_holder(f"g{key % 2}")
            held = [t for t in held if t in book.tickets]
        assert granted <= 10
        assert sum(book.in_flight.values()) == len(book.tickets) == len(held)
        assert all(v <= 3 for v in book.in_flight.values())
    for ticket in held:
        book.release(ticket)
    assert book.in_flight == {} and book.tickets == {}


async def test_the_coordinator_list_follows_membership_changes() -> None:
    """Who coordinates whom is remembered between requests, and worked out
    again as soon as the ledger applies a membership change (or after
    GATEWAYS_TTL, for certificates that expire)."""
    from types import SimpleNamespace

    from p2pinfer.gateway import coordinator
    from p2pinfer.gateway.coordinator import QuotaService

    def member(peer: str, roles: set[str]) -> SimpleNamespace:
        return SimpleNamespace(peer_id=peer, roles=frozenset(roles), active=lambda now: True)

    members = [member("g-b", {"gateway"}), member("w-c", {"inference"})]
    lookups = 0

    def listed() -> list[SimpleNamespace]:
        nonlocal lookups
        lookups += 1
        return list(members)

    store = SimpleNamespace(credentials_version=1)
    node = FakeContext(ledger=SimpleNamespace(store=store, members=listed))
    quota = QuotaService(node)
    me = node.peer_id
    assert me < "g-b" and quota.gateways() == [me, "g-b"]
    first = quota.order("user-1")
    assert sorted(first) == [me, "g-b"] and quota.order("user-1") == first
    assert lookups == 1  # remembered
    members.append(member("g-d", {"gateway"}))
    assert quota.gateways() == [me, "g-b"]  # nothing applied yet
    store.credentials_version += 1  # the ledger applied the admission
    assert quota.gateways() == [me, "g-b", "g-d"]
    assert quota.order("user-1") == rendezvous_order("user-1", [me, "g-b", "g-d"])
    members.pop()  # e.g. its certificate expired: no event, only time
    assert "g-d" in quota.gateways()
    assert quota._gateways is not None
    stamp, _, found = quota._gateways
    quota._gateways = (stamp, 0.0, found)  # GATEWAYS_TTL has passed
    assert quota.gateways() == [me, "g-b"]
    assert coordinator.GATEWAYS_TTL <= 5


def test_a_named_ticket_is_counted_once_and_can_be_returned_before_it_is_granted() -> None:
    """A gateway names its tickets: asking again with the same name (its
    connection broke under the first ask) gets the same ticket, counted
    once; a name it returned before the grant arrived (it gave up waiting)
    is never granted; only the holder can return a ticket."""
    book = QuotaBook()
    limits = Limits(requests_per_window=100, concurrent_per_key=4)
    first = book.acquire("u", "k", limits, holder="gw-a", now=T0, ticket_id="gw-a/1")
    again = book.acquire("u", "k", limits, holder="gw-a", now=T0, ticket_id="gw-a/1")
    assert again is first and book.held() == 1 and book.usage("u", now=T0)["requests"] == 1
    assert not book.release("gw-a/1", holder="gw-b")  # not gw-b's
    assert book.release("gw-a/1", holder="gw-a") and book.held() == 0
    assert not book.release("gw-a/2", now=T0)  # given up on before it was granted
    with pytest.raises(errors.InvalidParams):
        book.acquire("u", "k", limits, holder="gw-a", now=T0 + 1, ticket_id="gw-a/2")
    assert book.held() == 0 and book.usage("u", now=T0)["requests"] == 1
    book.expire(T0 + 901)  # the name is forgotten with the tickets of its time
    assert not book.released_early


async def test_a_gateway_returns_the_ticket_it_gave_up_waiting_for(
        nursery: Any) -> None:
    """A coordinator too slow to answer may still grant the ticket: the
    gateway fails over and returns that ticket by name at once, instead of
    leaving a concurrency slot taken until the ticket expires (15 min)."""
    from types import SimpleNamespace

    import trio

    from p2pinfer.gateway.coordinator import QuotaService

    calls: list[tuple[str, str, Any]] = []

    async def call(peer: str, method: str, params: Any) -> Any:
        calls.append((peer, method, params))
        if method == "quota.acquire":
            await trio.sleep(10)  # granted, but the answer comes too late
        return {"released": True}

    members = [SimpleNamespace(peer_id="g-b", roles=frozenset({"gateway"}),
                               active=lambda now: True)]
    ledger = SimpleNamespace(store=SimpleNamespace(credentials_version=1),
                             members=lambda: members)
    node = FakeContext(ledger=ledger, rpc=SimpleNamespace(call=call))
    quota = QuotaService(node, timeout=0.2)
    await nursery.start(quota.run)
    user = next(u for u in (f"user-{i}" for i in range(100))
                if quota.order(u)[0] == "g-b")  # one that g-b coordinates
    lease = await quota.acquire(user, "k", Limits(requests_per_window=10))
    assert lease.coordinator == node.peer_id and quota.failovers == 1  # failed over
    await trio.sleep(0.1)
    (asked,) = [p for _, m, p in calls if m == "quota.acquire"]
    (returned,) = [(peer, p) for peer, m, p in calls if m == "quota.release"]
    assert returned == ("g-b", {"ticket": f"{node.peer_id}/{asked['ticket']}", "tokens": 0})
