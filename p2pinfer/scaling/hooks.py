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

Delivery never holds up evaluation: :class:`HookRunner` is a
:class:`~p2pinfer.notify.Notifier` (a bounded queue that drops the oldest
body, delivered in order, each command run and POST retried up to
``attempts`` times with backoff).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import httpx
import trio

from ..notify import Delivery, Notifier, post_json
from .triggers import TriggerEvent

__all__ = ["HookRunner", "hook_body", "hook_env"]

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


class HookRunner(Notifier):
    """Runs the hook command and/or posts the webhook for each queued body
    (a :class:`~p2pinfer.notify.Notifier` with one delivery per kind,
    ``command`` then ``webhook``).

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
        deliveries: dict[str, Delivery] = {}
        if self.command:
            deliveries["command"] = self._run_command
        if url:
            deliveries["webhook"] = partial(_post, url)
        super().__init__("scaling hook", deliveries, timeout=timeout, attempts=attempts,
                         queue_size=queue_size, transport=transport, on_result=on_result)

    @property
    def enabled(self) -> bool:
        return bool(self.command or self.url)

    async def _run_command(self, client: httpx.AsyncClient,
                           body: dict[str, Any]) -> str | None:
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



async def _post(url: str, client: httpx.AsyncClient, body: dict[str, Any]) -> str | None:
    return await post_json(client, url, body)
