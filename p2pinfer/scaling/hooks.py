"""The scaling hook: a command and/or a webhook run on every trigger change.

Each :class:`~.triggers.TriggerEvent` becomes one JSON body
(:func:`hook_body`)::

    {"version": 1, "source": "p2pinfer", "event": "fired", "status": "firing",
     "trigger": "queue_depth", "model": "smollm2", "scope": "node",
     "node": "12D3KooW...", "value": 131.5, "threshold": 100.0,
     "window": 60.0, "figures": {"cpu_percent": 42.0, "queue_depth": 131.5,
     "in_flight": 4.0, "slots": 4, "avg_response_time": 2.31, "completed": 57,
     "samples": 12, "workers": 1},
     "time": 1767225600.0, "time_iso": "2026-01-01T00:00:00Z"}

``event`` is ``fired`` or ``cleared`` (``status``: ``firing`` /
``resolved``, as Alertmanager says); ``scope`` is ``node`` (this worker's
own figures) or ``swarm`` (every worker of the model, seen by a metrics
node). An orchestrator adds workers on ``fired`` and may remove them on
``cleared``.

- **command** (``[scaling] hook_command``, an argv; no shell): run with the
  body on stdin and ``P2PINFER_SCALING_EVENT``, ``_TRIGGER``, ``_MODEL``,
  ``_SCOPE``, ``_NODE``, ``_VALUE``, ``_THRESHOLD`` and ``_JSON`` (the
  body) in its environment; exit status 0 is success; it is killed after
  ``hook_timeout`` seconds.
- **webhook** (``[scaling] hook_url``): the body POSTed as JSON; any 2xx is
  success.

Delivery never holds up evaluation: bodies are queued
(:meth:`HookRunner.notify_nowait`, the oldest dropped beyond ``queue_size``)
and :meth:`HookRunner.run` delivers them in order, each up to ``attempts``
times with backoff.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import trio

from .triggers import TriggerEvent

__all__ = ["HookRunner", "HookStats", "hook_body", "hook_env"]

log = logging.getLogger(__name__)

ENV_PREFIX = "P2PINFER_SCALING_"


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def hook_body(event: TriggerEvent, *, node: str, window: float,
              wall: float | None = None) -> dict[str, Any]:
    """The JSON body announcing ``event`` (see the module docstring)."""
    wall = time.time() if wall is None else wall
    return {
        "version": 1,
        "source": "p2pinfer",
        "event": event.status,
        "status": "firing" if event.status == "fired" else "resolved",
        "trigger": event.trigger,
        "model": event.model,
        "scope": event.scope,
        "node": node,
        "value": None if event.value is None else round(event.value, 4),
        "threshold": event.threshold,
        "window": window,
        "figures": event.figures.to_dict(),
        "time": round(wall, 3),
        "time_iso": _iso(wall),
    }


def hook_env(body: dict[str, Any]) -> dict[str, str]:
    """The ``P2PINFER_SCALING_*`` variables a hook command gets for ``body``."""
    return {
        ENV_PREFIX + "EVENT": str(body["event"]),
        ENV_PREFIX + "TRIGGER": str(body["trigger"]),
        ENV_PREFIX + "MODEL": str(body["model"]),
        ENV_PREFIX + "SCOPE": str(body["scope"]),
        ENV_PREFIX + "NODE": str(body["node"]),
        ENV_PREFIX + "VALUE": "" if body["value"] is None else str(body["value"]),
        ENV_PREFIX + "THRESHOLD": str(body["threshold"]),
        ENV_PREFIX + "JSON": json.dumps(body, separators=(",", ":")),
    }


@dataclass
class HookStats:
    """Deliveries of a :class:`HookRunner`, per kind (``command``, ``webhook``)."""

    sent: int = 0
    failed: int = 0
    dropped: int = 0
    queued: int = 0


class HookRunner:
    """Runs the hook command and/or posts the webhook for each queued body.

    Args:
        command: argv of the hook command (empty: none).
        url: the webhook URL (None: none).
        timeout: seconds per command run or POST.
        attempts: tries per body and kind.
        queue_size: bodies waiting at most.
        transport: an httpx transport (tests may pass ``MockTransport``).
        on_result: called with ``(kind, outcome)`` after each delivery
            (``success`` / ``failure``), e.g. to count it in metrics.
    """

    def __init__(self, *, command: Sequence[str] = (), url: str | None = None,
                 timeout: float = 10.0, attempts: int = 3, queue_size: int = 100,
                 transport: httpx.AsyncBaseTransport | None = None,
                 on_result: Callable[[str, str], None] | None = None) -> None:
        self.command = tuple(command)
        self.url = url
        self.timeout = timeout
        self.attempts = attempts
        self.queue_size = queue_size
        self.transport = transport
        self.on_result = on_result
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = trio.Event()
        self._stats = HookStats()
        self.delivered: list[dict[str, Any]] = []  # the last few bodies, newest last

    @property
    def enabled(self) -> bool:
        return bool(self.command or self.url)

    def statistics(self) -> HookStats:
        self._stats.queued = len(self._queue)
        return HookStats(**vars(self._stats))

    def notify_nowait(self, body: dict[str, Any]) -> None:
        """Queue ``body``; never blocks."""
        if not self.enabled:
            return
        if len(self._queue) >= self.queue_size:
            self._queue.popleft()
            self._stats.dropped += 1
            log.warning("scaling hook queue full: dropped the oldest notification")
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
                if self.command:
                    await self._retry("command", partial(self._run_command, body))
                if self.url:
                    await self._retry("webhook", partial(self._post, client, body))
                self.delivered = [*self.delivered[-19:], body]

    async def _retry(self, kind: str,
                     attempt: Callable[[], Awaitable[str | None]]) -> None:
        delay = 0.5
        for n in range(1, self.attempts + 1):
            problem = await attempt()
            if problem is None:
                self._stats.sent += 1
                self._report(kind, "success")
                return
            log.warning("scaling %s failed (attempt %d/%d): %s", kind, n, self.attempts,
                        problem)
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
                log.exception("scaling hook result callback failed")

    async def _run_command(self, body: dict[str, Any]) -> str | None:
        data = json.dumps(body).encode()
        env = {**os.environ, **hook_env(body)}
        try:
            with trio.fail_after(self.timeout):
                done = await trio.run_process(list(self.command), stdin=data, env=env,
                                              capture_stdout=True, capture_stderr=True,
                                              check=False)
        except trio.TooSlowError:
            return f"{self.command[0]} did not finish within {self.timeout} s (killed)"
        except OSError as exc:
            return f"cannot run {self.command[0]}: {exc}"
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip()[-300:]
            return f"{self.command[0]} exited with status {done.returncode}: {err}"
        out = done.stdout.decode(errors="replace").strip()
        if out:
            log.info("scaling hook: %s", out[-300:])
        return None

    async def _post(self, client: httpx.AsyncClient, body: dict[str, Any]) -> str | None:
        assert self.url is not None
        try:
            response = await client.post(self.url, json=body)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return f"{type(exc).__name__}: {exc}"
        if response.status_code >= 300:
            return f"HTTP {response.status_code}"
        return None
