"""Notifications that never hold up their sender: a bounded queue, retries.

Alert webhooks (:mod:`p2pinfer.metrics.webhook`) and scaling hooks
(:mod:`p2pinfer.scaling.hooks`) both hand JSON bodies to a
:class:`Notifier`: :meth:`Notifier.notify_nowait` queues one (beyond
``queue_size`` waiting, the oldest is dropped and counted) and
:meth:`Notifier.run` delivers them in order through each of its
*deliveries* (an async callable returning None on success or what went
wrong), retrying a failed one up to ``attempts`` times with backoff (0.5 s,
doubling). :func:`post_json` is the webhook delivery both use.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import trio

__all__ = ["Delivery", "Notifier", "NotifierStats", "post_json"]

log = logging.getLogger(__name__)

# One way to deliver a body: None on success, else what went wrong.
Delivery = Callable[[httpx.AsyncClient, dict[str, Any]], Awaitable[str | None]]


@dataclass
class NotifierStats:
    """Deliveries of a :class:`Notifier` (a body counts once per delivery kind)."""

    sent: int = 0
    failed: int = 0
    dropped: int = 0
    queued: int = 0


async def post_json(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> str | None:
    """POST ``body`` to ``url``: None on any 2xx, else what went wrong."""
    try:
        response = await client.post(url, json=body)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return f"{type(exc).__name__}: {exc}"
    if response.status_code >= 300:
        return f"HTTP {response.status_code}"
    return None


class Notifier:
    """Queues bodies and delivers them in order (see the module docstring).

    Args:
        name: what the log lines call it ("alert webhook", "scaling hook").
        deliveries: kind -> delivery, tried in this order for every body.
        timeout: seconds per HTTP request (the client's timeout).
        attempts: tries per body and kind.
        queue_size: bodies waiting at most.
        transport: an httpx transport (tests may pass ``MockTransport``).
        on_result: called with ``(kind, "success" | "failure")`` after each
            delivery, e.g. to count it in metrics.
    """

    def __init__(self, name: str, deliveries: Mapping[str, Delivery], *, timeout: float,
                 attempts: int = 3, queue_size: int = 100,
                 transport: httpx.AsyncBaseTransport | None = None,
                 on_result: Callable[[str, str], None] | None = None) -> None:
        self.name = name
        self.deliveries = dict(deliveries)
        self.timeout = timeout
        self.attempts = attempts
        self.queue_size = queue_size
        self.transport = transport
        self.on_result = on_result
        self.delivered: list[dict[str, Any]] = []  # the last few bodies, newest last
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = trio.Event()
        self._stats = NotifierStats()

    def statistics(self) -> NotifierStats:
        """Sent, failed, dropped and queued counts."""
        self._stats.queued = len(self._queue)
        return NotifierStats(**vars(self._stats))

    def notify_nowait(self, body: dict[str, Any]) -> None:
        """Queue ``body``; never blocks."""
        if not self.deliveries:
            return
        if len(self._queue) >= self.queue_size:
            self._queue.popleft()
            self._stats.dropped += 1
            log.warning("%s queue full: dropped the oldest notification", self.name)
        self._queue.append(body)
        self._wake.set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver queued bodies until cancelled."""
        async with httpx.AsyncClient(transport=self.transport, timeout=self.timeout) as client:
            task_status.started()
            while True:
                while not self._queue:
                    self._wake = trio.Event()
                    await self._wake.wait()
                body = self._queue.popleft()
                for kind, deliver in self.deliveries.items():
                    await self._retry(kind, deliver, client, body)
                self.delivered = [*self.delivered[-19:], body]

    async def _retry(self, kind: str, deliver: Delivery, client: httpx.AsyncClient,
                     body: dict[str, Any]) -> None:
        delay = 0.5
        for n in range(1, self.attempts + 1):
            problem = await deliver(client, body)
            if problem is None:
                self._stats.sent += 1
                self._report(kind, "success")
                return
            log.warning("%s %s failed (attempt %d/%d): %s", self.name, kind, n,
                        self.attempts, problem)
            if n < self.attempts:
                await trio.sleep(delay)
                delay *= 2
        self._stats.failed += 1
        self._report(kind, "failure")

    def _report(self, kind: str, outcome: str) -> None:
        if self.on_result is not None:
            try:
                self.on_result(kind, outcome)
            except Exception:
                log.exception("%s result callback failed", self.name)
