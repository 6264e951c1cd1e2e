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

Delivery never holds up alert evaluation: :class:`WebhookNotifier` is a
:class:`~p2pinfer.notify.Notifier` (a bounded queue that drops the oldest
body, delivered in order, each POST retried up to ``attempts`` times with
backoff).
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import httpx

from ..notify import Notifier, post_json
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


class WebhookNotifier(Notifier):
    """Posts alert transitions to ``url`` (one body each, see :func:`alert_body`).

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
        super().__init__("alert webhook", {"webhook": partial(_post, url)}, timeout=timeout,
                         attempts=attempts, queue_size=queue_size, transport=transport)

    def notify_transitions(self, transitions: list[Transition]) -> None:
        """Queue one body per transition; never blocks."""
        for transition in transitions:
            self.notify_nowait(alert_body(transition, source=self.source))


async def _post(url: str, client: httpx.AsyncClient, body: dict[str, Any]) -> str | None:
    return await post_json(client, url, body)
