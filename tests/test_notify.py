"""The shared notifier (p2pinfer.notify): order, retries with backoff, the
oldest dropped when the queue is full, one result per delivery kind. The
alert webhook and the scaling hook are tested end to end with real
receivers in test_metrics_role.py and test_ops_scaling.py."""

from __future__ import annotations

from typing import Any

import httpx
import trio

from p2pinfer.notify import Notifier


async def test_order_retries_and_drops() -> None:
    seen: list[tuple[str, int]] = []
    fail_first = {2}
    results: list[tuple[str, str]] = []
    all_done = trio.Event()

    def on_result(kind: str, outcome: str) -> None:
        results.append((kind, outcome))
        if len(results) == 6:
            all_done.set()

    async def flaky(client: httpx.AsyncClient, body: dict[str, Any]) -> str | None:
        seen.append(("flaky", body["n"]))
        if body["n"] in fail_first:
            fail_first.discard(body["n"])
            return "HTTP 503"
        return None

    async def always_fails(client: httpx.AsyncClient, body: dict[str, Any]) -> str | None:
        seen.append(("broken", body["n"]))
        return "refused"

    notifier = Notifier("test", {"flaky": flaky, "broken": always_fails}, timeout=1,
                        attempts=2, queue_size=3,
                        on_result=on_result)
    for n in range(5):  # 0 and 1 are dropped: the queue holds 3
        notifier.notify_nowait({"n": n})
    assert notifier.statistics().dropped == 2 and notifier.statistics().queued == 3
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.run)
            await all_done.wait()
            nursery.cancel_scope.cancel()
    assert [n for kind, n in seen if kind == "flaky"] == [2, 2, 3, 4]  # in order, 2 retried
    assert [n for kind, n in seen if kind == "broken"] == [2, 2, 3, 3, 4, 4]  # 2 tries each
    assert results == [("flaky", "success"), ("broken", "failure")] * 3
    stats = notifier.statistics()
    assert (stats.sent, stats.failed, stats.dropped, stats.queued) == (3, 3, 2, 0)
    assert [b["n"] for b in notifier.delivered] == [2, 3, 4]


def test_a_notifier_with_nothing_to_deliver_queues_nothing() -> None:
    notifier = Notifier("idle", {}, timeout=1)
    notifier.notify_nowait({"n": 1})
    assert notifier.statistics().queued == 0
