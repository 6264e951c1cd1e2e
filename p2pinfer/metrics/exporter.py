"""The HTTP face of the metrics role: a tiny Starlette app on Hypercorn (trio).

Routes:

- ``GET /metrics``: the swarm-wide Prometheus exposition (every node's
  series with a ``node`` label, plus ``ai_platform_node_up``,
  ``ai_platform_model_workers`` and ``ai_platform_alerts_firing``);
- ``GET /health``: the member view of ``getSystemHealth`` as JSON (status
  503 when ``critical``);
- ``GET /alerts``: firing and pending alerts as JSON.

It listens on ``metrics.host`` (127.0.0.1 by default: the member view of the
swarm is not for the open network) and ``PROMETHEUS_PORT``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["build_app", "serve_http"]

log = logging.getLogger(__name__)


def build_app(*, metrics: Callable[[], Awaitable[bytes]],
              health: Callable[[], Awaitable[dict[str, Any]]],
              alerts: Callable[[], dict[str, Any]]) -> Starlette:
    """The exporter app over three providers (kept small so tests can build it)."""

    async def get_metrics(request: Request) -> Response:
        return Response(await metrics(), media_type=CONTENT_TYPE_LATEST)

    async def get_health(request: Request) -> Response:
        body = await health()
        return JSONResponse(body, status_code=503 if body.get("status") == "critical" else 200)

    async def get_alerts(request: Request) -> Response:
        return JSONResponse(alerts())

    return Starlette(routes=[
        Route("/metrics", get_metrics, methods=["GET"]),
        Route("/health", get_health, methods=["GET"]),
        Route("/alerts", get_alerts, methods=["GET"]),
    ])


async def serve_http(app: Any, host: str, port: int, *,
                     task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` until cancelled; ``task_status.started(url)`` gives the
    bound ``http://host:port`` (useful with port 0)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0

    async def run(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(run)
        url = str(binds[0]) if binds else f"http://{host}:{port}"
        log.info("metrics exporter on %s/metrics", url)
        task_status.started(url)
