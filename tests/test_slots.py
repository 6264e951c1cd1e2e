"""Fair share of a worker's slots between users (p2pinfer.inference.slots)
and the engine's use of it, with the synthetic backend."""

from __future__ import annotations

import trio
import trio.testing

from p2pinfer import errors
from p2pinfer.inference.backend import GenerationParams, Message
from p2pinfer.inference.engine import Completion, InferenceEngine
from p2pinfer.inference.slots import Displaced, SlotPool
from p2pinfer.inference.synthetic import SyntheticBackend
from p2pinfer.prompts import PromptRequest


async def test_a_freed_slot_goes_to_the_share_holding_fewest() -> None:
    """Share "a" queues six requests before "b" asks once: "b" gets the
    next slot that frees, not the seventh."""
    pool = SlotPool(2)
    order: list[str] = []
    done = {i: trio.Event() for i in range(9)}

    async def user(i: int, share: str) -> None:
        await pool.acquire(share)
        order.append(f"{share}{i}")
        await done[i].wait()
        pool.release(share)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(user, i, "a")
                await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(user, 8, "b")
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["a0", "a1"] and pool.statistics().waiting == 7
            done[0].set()
            await trio.testing.wait_all_tasks_blocked()
            assert order[2] == "b8"  # "a" holds 1, "b" none: b first
            assert pool.held_by("a") == 1 and pool.held_by("b") == 1
            for i in (1, 2, 3, 4, 5, 6, 7, 8):
                done[i].set()
                await trio.testing.wait_all_tasks_blocked()
    assert order[3:] == ["a2", "a3", "a4", "a5", "a6", "a7"]  # in arrival order
    assert pool.in_use == 0 and pool.held_by("a") == 0


async def test_one_share_is_first_come_first_served() -> None:
    pool = SlotPool(1)
    order: list[int] = []
    gate = trio.Event()

    async def user(i: int) -> None:
        await pool.acquire("x")
        order.append(i)
        await gate.wait()
        pool.release("x")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(user, i)
                await trio.testing.wait_all_tasks_blocked()
            gate.set()
    assert order == [0, 1, 2, 3, 4]


async def test_make_room_displaces_the_heaviest_shares_newest_waiter() -> None:
    pool = SlotPool(1)
    pool.acquire_nowait("a")
    outcomes: dict[str, str] = {}

    async def wait(name: str, share: str) -> None:
        try:
            await pool.acquire(share)
        except Displaced:
            outcomes[name] = "displaced"
        else:
            outcomes[name] = "granted"
            pool.release(share)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for name in ("a1", "a2"):
                nursery.start_soon(wait, name, "a")
                await trio.testing.wait_all_tasks_blocked()
            assert not pool.make_room("a")  # "a" is the heaviest itself
            assert pool.make_room("b")      # a: 1 held + 2 waiting, b: none
            await trio.testing.wait_all_tasks_blocked()
            assert outcomes == {"a2": "displaced"}
            nursery.start_soon(wait, "b1", "b")
            await trio.testing.wait_all_tasks_blocked()
            # a: 1 held + 1 waiting, b: 1 waiting: taking a1's place would
            # only swap who is short, so a second "b" is refused
            assert not pool.make_room("b")
            pool.release("a")
    assert outcomes == {"a2": "displaced", "b1": "granted", "a1": "granted"}
    assert pool.statistics().waiting == 0 and pool.in_use == 0


async def test_a_cancelled_waiter_of_the_lightest_share_leaves_no_trace() -> None:
    pool = SlotPool(1)
    pool.acquire_nowait("a")
    got: list[str] = []

    async def waiter(share: str, scope_out: list[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            scope_out.append(scope)
            await pool.acquire(share)
            got.append(share)
            pool.release(share)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            scopes: list[trio.CancelScope] = []
            nursery.start_soon(waiter, "b", scopes)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter, "c", scopes)
            await trio.testing.wait_all_tasks_blocked()
            scopes[0].cancel()  # "b" gives up waiting ...
            await trio.testing.wait_all_tasks_blocked()
            pool.release("a")   # ... so the slot goes to "c"
    assert got == ["c"] and pool.in_use == 0


def _request(share: str, tokens: int = 5) -> PromptRequest:
    return PromptRequest(model=None, messages=(Message("user", "hi"),),
                         params=GenerationParams(max_tokens=tokens, temperature=0.7),
                         use_cache=False, share=share)


async def _answer(engine: InferenceEngine, share: str, tokens: int = 5) -> Completion:
    async for event in engine.generate(_request(share, tokens)):
        if isinstance(event, Completion):
            return event
    raise AssertionError("no completion")


async def test_the_engine_refuses_the_heaviest_user_when_its_queue_is_full() -> None:
    """One slot, a queue of two, both held by "a": a request of "b" takes
    the newest "a" waiter's place, which gets Overloaded; a third "a" is
    refused at once."""
    engine = InferenceEngine()
    engine.add_model(SyntheticBackend("m", tokens=5, token_delay=0.05, slots=1),
                     aliases=["default"], max_queue=2)
    results: dict[str, object] = {}
    all_in = trio.Event()

    async def ask(name: str, share: str) -> None:
        try:
            results[name] = await _answer(engine, share)
        except errors.Overloaded as exc:
            results[name] = exc
        if len(results) == 5:
            all_in.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            for name in ("a0", "a1", "a2"):
                nursery.start_soon(ask, name, "a")
                await trio.testing.wait_all_tasks_blocked()
            await ask("a3", "a")  # one running, two queued: full
            assert isinstance(results["a3"], errors.Overloaded)
            nursery.start_soon(ask, "b0", "b")
            await trio.testing.wait_all_tasks_blocked()
            assert isinstance(results["a2"], errors.Overloaded)
            assert "another user" in results["a2"].message
            await all_in.wait()
            nursery.cancel_scope.cancel()
    assert all(isinstance(results[n], Completion) for n in ("a0", "a1", "b0")), results



async def test_a_slot_is_kept_for_a_recent_user_holding_none() -> None:
    """Two slots: "b" asked a moment ago and holds none now, so "a", which
    holds one, waits for its own to free rather than take the last; "b"
    then gets it at once. Alone (no recent "b"), "a" uses both."""
    pool = SlotPool(2, reserve=30.0)
    pool.acquire_nowait("b")
    pool.release("b")  # b is recent, holds none
    pool.acquire_nowait("a")
    with trio.testing.assert_checkpoints():  # a second one for "a" must wait
        with trio.move_on_after(0.05):
            await pool.acquire("a")
    assert pool.held_by("a") == 1 and pool.free == 1
    pool.acquire_nowait("b")  # b is served at once
    assert pool.free == 0
    pool.release("b")
    pool.release("a")
    alone = SlotPool(2, reserve=0.01)
    alone.acquire_nowait("b")
    alone.release("b")
    await trio.sleep(0.02)  # b is no longer recent
    alone.acquire_nowait("a")
    alone.acquire_nowait("a")
    assert alone.held_by("a") == 2


async def test_users_gone_quiet_are_forgotten() -> None:
    pool = SlotPool(1, reserve=0.01)
    for n in range(300):
        pool.acquire_nowait(f"user-{n}")
        pool.release(f"user-{n}")
        if n == 150:
            await trio.sleep(0.02)  # the first 151 go quiet
    assert len(pool._seen) <= 256
