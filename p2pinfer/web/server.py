"""The one place where the web role's HTTP server is set up: Hypercorn's
trio worker serving an ASGI app.

Kept apart from the routes so that HTTPS (a certificate and key handed to
Hypercorn) and any other listener option change this module only.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

__all__ = ["serve_app"]

log = logging.getLogger(__name__)


def _config(host: str, port: int, *, certfile: str | None, keyfile: str | None,
            idle_timeout: float = 30.0) -> Any:
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0
    # Browsers and SDK clients keep connections open; idle ones go after
    # [web] idle_timeout, and so do ones whose request line and headers take
    # that long (Hypercorn's idle timer runs until the headers are in).
    config.keep_alive_timeout = idle_timeout
    config.include_server_header = False
    if certfile is not None:
        config.certfile = certfile
        config.keyfile = keyfile
    return config


async def serve_app(app: Any, host: str, port: int, *, certfile: str | None = None,
                    keyfile: str | None = None, idle_timeout: float = 30.0,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on ``host:port`` until cancelled; HTTPS (TLS 1.2+) when
    ``certfile`` and ``keyfile`` are given; a connection idle for
    ``idle_timeout`` seconds, or that long sending a request's headers, is
    closed.

    ``task_status.started((url, port))`` reports the bound URL
    (``http://`` or ``https://``) and port (the real one when ``port`` is 0).
    """
    from hypercorn.trio import serve

    config = _config(host, port, certfile=certfile, keyfile=keyfile,
                     idle_timeout=idle_timeout)

    async def run(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(run)
        url = str(binds[0]) if binds else f"http://{host}:{port}"
        bound = int(url.rsplit(":", 1)[1].rstrip("/"))
        log.info("web interface on %s", url)
        task_status.started((url, bound))
