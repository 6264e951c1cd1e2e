"""Alert notifications: one JSON POST per alert that fires or resolves.

The body follows Alertmanager's webhook format (version 4), so receivers
written for Alertmanager accept it::

    {"version": "4", "status": "firing", "receiver": "p2pinfer",
     "groupKey": "p2pinfer/NodeDown/<fingerprint>",
     "commonLabels": {"alertname": "NodeDown", "severity": "warning", "node": "12D3..."},
     "commonAnnotations": {"summary": "node 12D3... does not answer"},
     "groupLabels": {"alertname": "NodeDown"}, "externalURL": "",
     "truncatedAlerts": 0, "source": "<peer id of the metrics node>",
     "alerts": [{"status": "firing", "labels": {...}, "annotations": {...},
                 "startsAt": "2025-01-01T00:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
                 "fingerprint": "...", "value": 0.0}]}

Delivery never holds up alert evaluation: :meth:`WebhookNotifier.notify_nowait`
queues (at most ``queue_size`` bodies; beyond that the oldest waiting ones are
dropped and counted) and :meth:`WebhookNotifier.run` posts them in order,
retrying a failed POST up to ``attempts`` times with backoff.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from .alerts import Transition

__all__ = ["WebhookNotifier", "alert_body"]

log = logging.getLogger(__name__)

_ZERO_TIME = "0001-01-01T00:00:00Z"


def _iso(wall: float | None) -> str:
    if wall is None:
        return _ZERO_TIME
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


def alert_body(transition: Transition, *, source: str) -> dict[str, Any]:
    """The JSON body announcing one transition."""
    alert = transition.alert
    labels = {"alertname": alert.name, "severity": alert.severity, **alert.labels}
    annotations = {"summary": alert.summary}
    return {
        "version": "4",
        "status": transition.status,
        "receiver": "p2pinfer",
        "groupKey": f"p2pinfer/{alert.name}/{alert.fingerprint}",
        "groupLabels": {"alertname": alert.name},
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": "",
        "truncatedAlerts": 0,
        "source": source,
        "alerts": [{
            "status": transition.status,
            "labels": labels,
            "annotations": annotations,
            "startsAt": _iso(alert.started_wall),
            "endsAt": _iso(alert.ended_wall),
            "fingerprint": alert.fingerprint,
            "value": alert.to_dict()["value"],
        }],
    }


@dataclass
class WebhookStats:
    """Counters of a :class:`WebhookNotifier`."""

    sent: int = 0
    failed: int = 0
    dropped: int = 0
    queued: int = 0


class WebhookNotifier:
    """Posts alert transitions to ``url``.

    Args:
        url: the receiver's http(s) URL.
        source: who is notifying (the metrics node's peer id).
        timeout: seconds per POST.
        attempts: tries per body before giving up on it.
        queue_size: bodies waiting at most.
        transport: an httpx transport (tests may pass ``MockTransport``).
    """

    def __init__(self, url: str, *, source: str, timeout: float = 5.0, attempts: int = 3,
                 queue_size: int = 100, transport: httpx.AsyncBaseTransport | None = None
                 ) -> None:
        self.url = url
        self.source = source
        self.timeout = timeout
        self.attempts = attempts
        self.queue_size = queue_size
        self.transport = transport
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = trio.Event()
        self._stats = WebhookStats()

    def statistics(self) -> WebhookStats:
        """Sent, failed, dropped and queued counts."""
        self._stats.queued = len(self._queue)
        return WebhookStats(**vars(self._stats))

    def notify_nowait(self, transitions: list[Transition]) -> None:
        """Queue one body per transition; never blocks."""
        for transition in transitions:
            if len(self._queue) >= self.queue_size:
                self._queue.popleft()
                self._stats.dropped += 1
                log.warning("alert webhook queue full: dropped the oldest notification")
            self._queue.append(alert_body(transition, source=self.source))
        if transitions:
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
                await self._deliver(client, body)

    async def _deliver(self, client: httpx.AsyncClient, body: dict[str, Any]) -> None:
        delay = 0.5
        for attempt in range(1, self.attempts + 1):
            try:
                response = await client.post(self.url, json=body)
                if response.status_code < 300:
                    self._stats.sent += 1
                    return
                problem = f"HTTP {response.status_code}"
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            log.warning("alert webhook %s failed (attempt %d/%d): %s", self.url, attempt,
                        self.attempts, problem)
            if attempt < self.attempts:
                await trio.sleep(delay)
                delay *= 2
        self._stats.failed += 1
