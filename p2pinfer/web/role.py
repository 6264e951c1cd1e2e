"""The web role: the design document's web interface service.

One HTTP server inside the node (Hypercorn's trio worker and Starlette,
see :mod:`~p2pinfer.web.server`) serving the REST API, the OpenAI- and
Ollama-compatible APIs and the pages. It holds no state of its own: users,
keys and sessions belong to auth nodes and the ledger, inference to
gateways, all reached over RPC (:mod:`~p2pinfer.web.upstream`).
"""

from __future__ import annotations

import hashlib
import logging
from functools import partial
from typing import Any

import trio

from .app import build_app
from .pages import Pages
from .security import CsrfGuard
from .server import serve_app
from .sessions import SessionManager
from .settings import WebSettings
from .templating import make_environment
from .upstream import Upstream

__all__ = ["WebRole"]

log = logging.getLogger(__name__)


class WebRole:
    """The web role (see the module docstring).

    Attributes:
        url: ``http://host:port`` once :meth:`run` has bound (None before).
        port: the bound port (the real one when ``[web] port = 0``).
    """

    name = "web"

    def __init__(self, node: Any) -> None:
        self.node = node
        self.settings = WebSettings.from_config(node.config)
        s = self.settings
        self.tls = False
        self.url: str | None = None
        self.port: int | None = None
        self.upstream = Upstream(node, call_timeout=s.call_timeout,
                                 request_timeout=s.request_timeout, models_ttl=s.models_ttl)
        self.templates = make_environment(s.title)
        self.csrf = CsrfGuard(self._csrf_key(), cookie=s.csrf_cookie, secure=self.secure)
        self.sessions = SessionManager(self)
        self.pages = Pages(self)
        self.app = build_app(self)

    @property
    def secure(self) -> bool:
        """Whether cookies are marked Secure."""
        return self.settings.secure_cookies or self.tls

    def _csrf_key(self) -> bytes:
        # Ed25519 signatures are deterministic: the same key after a restart,
        # unknown to anyone without the node key.
        return hashlib.sha256(self.node.identity.sign(b"p2pinfer web csrf key v1")).digest()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve HTTP until cancelled; started once the port is bound."""
        async with trio.open_nursery() as nursery:
            self.url, self.port = await nursery.start(
                partial(serve_app, self.app, self.settings.host, self.settings.port))
            task_status.started()

    def describe(self) -> dict[str, Any]:
        return {"port": self.port}

    def topics(self) -> list[str]:
        return []
