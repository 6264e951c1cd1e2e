"""The web app and what it is built from, apart from the process serving it.

:class:`WebSite` holds the ``[web]`` settings, the :class:`WebUpstream`
the app reaches the swarm through, and the app itself (routes, pages,
sessions, CSRF guard, templates). The web role builds one inside the node
(its upstream calls the node directly); a front-door process builds one
whose upstream is the node over a local socket. Nothing in the app tells
the two apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .app import RequestCounter, build_app
from .pages import Pages
from .security import CsrfGuard
from .sessions import SessionManager
from .settings import WebSettings
from .templating import make_environment

if TYPE_CHECKING:  # pragma: no cover
    from .upstream import WebUpstream

__all__ = ["WebSite"]


class WebSite:
    """The web app of one node (see the module docstring).

    Args:
        settings: the ``[web]`` table.
        upstream: how the app reaches the swarm and its node.
        peer_id: the node's peer id (shown on the health route and pages).
        metrics: where HTTP requests are counted.
        csrf_key: the key the CSRF tokens of forms are derived from (the
            same in every process of a node).
        tls: whether HTTPS is served (cookies are then Secure).

    Attributes:
        url: ``http(s)://host:port`` once served (None before).
        app: the ASGI app.
    """

    def __init__(self, settings: WebSettings, upstream: WebUpstream, *, peer_id: str,
                 metrics: RequestCounter, csrf_key: bytes, tls: bool) -> None:
        self.settings = settings
        self.upstream = upstream
        self.peer_id = peer_id
        self.metrics = metrics
        self.tls = tls
        self.url: str | None = None
        self.templates = make_environment(settings.title)
        self.csrf = CsrfGuard(csrf_key, cookie=settings.csrf_cookie, secure=self.secure)
        self.sessions = SessionManager(self)
        self.pages = Pages(self)
        self.app: Any = build_app(self)

    @property
    def secure(self) -> bool:
        """Whether cookies are marked Secure."""
        return self.settings.secure_cookies or self.tls
