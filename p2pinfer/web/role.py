"""The web role: the web interface service.

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
from typing import TYPE_CHECKING, Any

import trio

from .server import serve_app
from .settings import WebSettings
from .site import WebSite
from .tls import SELF_SIGNED_WARNING, RedirectToHttps, TlsFiles, check_pair, ensure_self_signed
from .upstream import Upstream

if TYPE_CHECKING:
    from ..context import RoleContext

__all__ = ["WebRole"]

log = logging.getLogger(__name__)


class WebRole:
    """The web role (see the module docstring).

    Attributes:
        url: ``http(s)://host:port`` once :meth:`run` has bound (None before).
        port: the bound port (the real one when ``[web] port = 0``).
        tls: HTTPS is served (see :mod:`.tls`); cookies are then Secure.
        redirect_url: the plain-HTTP listener that redirects to HTTPS, if any.
    """

    name = "web"

    def __init__(self, node: RoleContext) -> None:
        self.node = node
        self.settings = WebSettings.from_config(node.config)
        s = self.settings
        self.tls_files = self._tls_files()
        self.tls = self.tls_files is not None
        self.port: int | None = None
        self.redirect_url: str | None = None
        self.upstream = Upstream(node, call_timeout=s.call_timeout,
                                 request_timeout=s.request_timeout, models_ttl=s.models_ttl)
        self.site = WebSite(s, self.upstream, peer_id=node.peer_id, metrics=node.metrics,
                            csrf_key=self._csrf_key(), tls=self.tls)
        self.app = self.site.app

    @property
    def url(self) -> str | None:
        """``http(s)://host:port`` once :meth:`run` has bound (None before)."""
        return self.site.url

    def _csrf_key(self) -> bytes:
        # Ed25519 signatures are deterministic: the same key after a restart,
        # unknown to anyone without the node key.
        return hashlib.sha256(self.node.identity.sign(b"p2pinfer web csrf key v1")).digest()

    def _tls_files(self) -> TlsFiles | None:
        """The certificate to serve HTTPS with (see :mod:`.tls`), checked; None: HTTP."""
        s = self.settings
        if s.tls_cert is not None and s.tls_key is not None:
            check_pair(s.tls_cert, s.tls_key)
            return TlsFiles(s.tls_cert, s.tls_key)
        if s.tls_self_signed:
            files = ensure_self_signed(self.node.config.home, [s.host, *s.tls_hosts])
            check_pair(files.cert, files.key)
            log.warning(SELF_SIGNED_WARNING.format(cert=files.cert, ca=files.ca))
            return files
        return None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve HTTP(S) until cancelled; started once the port is bound (and
        the redirect listener, if configured)."""
        s = self.settings
        files = self.tls_files
        async with trio.open_nursery() as nursery:
            self.site.url, self.port = await nursery.start(partial(
                serve_app, self.app, s.host, s.port,
                certfile=None if files is None else str(files.cert),
                keyfile=None if files is None else str(files.key)))
            if files is not None and s.redirect_port is not None:
                assert self.port is not None
                self.redirect_url, _ = await nursery.start(
                    serve_app, RedirectToHttps(self.port), s.host, s.redirect_port)
            task_status.started()

    def describe(self) -> dict[str, Any]:
        if self.tls:
            return {"port": self.port, "tls": True}
        return {"port": self.port}

    def topics(self) -> list[str]:
        return []
