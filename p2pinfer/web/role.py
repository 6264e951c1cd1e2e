"""The web role: the web interface service.

The REST API, the OpenAI- and Ollama-compatible APIs and the pages, served
either inside the node (``[web] workers = 0``: Hypercorn's trio worker,
see :mod:`~p2pinfer.web.server`) or by ``workers`` front-door processes
(:mod:`~p2pinfer.web.frontdoor`: uvicorn, each on a core of its own) that
accept on a listening socket this role opens and reach the swarm through
the node's local socket (:mod:`~p2pinfer.web.frontdoor_service`). A front
door that dies is started again. The role holds no state of its own:
users, keys and sessions belong to auth nodes and the ledger, inference to
gateways, all reached over RPC (:mod:`~p2pinfer.web.upstream`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from ..errors import ConfigError
from .frontdoor_service import FrontDoorService
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
        if s.workers:
            node.serve(FrontDoorService(self.upstream, node.peer_id, node.metrics))
        #: the front-door processes running now (pid by index), and how many
        #: times one was started again after it died
        self.front_doors: dict[int, int] = {}
        self.restarts = 0

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
            if s.workers:
                self.site.url, self.port = await nursery.start(self._serve_front_doors)
            else:
                self.site.url, self.port = await nursery.start(partial(
                    serve_app, self.app, s.host, s.port, idle_timeout=s.idle_timeout,
                    certfile=None if files is None else str(files.cert),
                    keyfile=None if files is None else str(files.key)))
            if files is not None and s.redirect_port is not None:
                assert self.port is not None
                self.redirect_url, _ = await nursery.start(partial(
                    serve_app, RedirectToHttps(self.port), s.host, s.redirect_port,
                    idle_timeout=s.idle_timeout))
            task_status.started()

    # -- front doors ---------------------------------------------------------------
    def _listen(self) -> socket.socket:
        s = self.settings
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        try:
            sock = socket.create_server((s.host, s.port), family=family, backlog=4096)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"web.port: port {s.port} is already in use on {s.host} "
                    f"({exc.strerror}); choose another [web] port",
                    data={"field": "port", "port": s.port, "reason": "in_use"}) from exc
            raise ConfigError(f"web.port: cannot listen on {s.host}:{s.port}: {exc.strerror}",
                              data={"field": "port"}) from exc
        sock.set_inheritable(True)
        return sock

    async def _serve_front_doors(self, *,
                                 task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Open the listening socket and the node's local socket, start the
        front doors, report ``(url, port)`` once all serve; keep them up."""
        s = self.settings
        sock = self._listen()
        try:
            port = int(sock.getsockname()[1])
            host = f"[{s.host}]" if ":" in s.host else s.host
            url = f"{'https' if self.tls else 'http'}://{host}:{port}"
            run_dir = self.node.config.home / "run"
            run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(run_dir, 0o700)
            path = run_dir / "web.sock"
            files = self.tls_files
            spec = {
                "socket": str(path), "fd": sock.fileno(), "url": url,
                "settings": s.to_wire(), "peer_id": self.node.peer_id,
                "roles": sorted(self.node.role_names),
                "csrf_key": self._csrf_key().hex(),
                "tls": None if files is None else {"cert": str(files.cert),
                                                  "key": str(files.key)},
                "log_level": logging.getLevelName(min(logging.getLogger().level or 30, 30)),
            }
            async with trio.open_nursery() as nursery:
                await nursery.start(self.node.serve_local, path)
                async with trio.open_nursery() as starting:  # all at once: ~0.5 s each
                    for index in range(s.workers):
                        starting.start_soon(nursery.start, self._front_door, index, spec, sock)
                log.info("web interface on %s (%d front-door processes)", url, s.workers)
                task_status.started((url, port))
        finally:
            sock.close()

    async def _front_door(self, index: int, spec: dict[str, Any], sock: socket.socket, *,
                          task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run front door ``index``; start it again if it dies (after 1 s,
        doubling to 30 s while it keeps dying within a minute)."""
        delay = 1.0
        while True:
            started = trio.current_time()
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "p2pinfer.web.frontdoor"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, pass_fds=(sock.fileno(),))
            self.front_doors[index] = proc.pid
            try:
                assert proc.stdin is not None and proc.stdout is not None
                await proc.stdin.send_all(json.dumps(spec).encode() + b"\n")
                await proc.stdin.aclose()
                seen = b""
                with trio.move_on_after(60):
                    while b"ready" not in seen:
                        data = await proc.stdout.receive_some(1024)
                        if not data:
                            break
                        seen += data
                if b"ready" not in seen:
                    raise ConfigError(f"front door {index} did not start (exit status "
                                      f"{proc.poll()}); see its errors above")
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                while await proc.stdout.receive_some(1024):
                    pass  # it says nothing more; EOF: it exited
                status = await proc.wait()
            finally:
                with trio.CancelScope(shield=True):
                    if proc.returncode is None:
                        proc.terminate()
                        with trio.move_on_after(5):
                            await proc.wait()
                        if proc.returncode is None:
                            proc.kill()
                            await proc.wait()
                self.front_doors.pop(index, None)
            self.restarts += 1
            if trio.current_time() - started > 60:
                delay = 1.0
            log.error("front door %d (pid %d) exited with status %s; starting it again in "
                      "%.0f s", index, proc.pid, status, delay)
            await trio.sleep(delay)
            delay = min(30.0, delay * 2)

    def describe(self) -> dict[str, Any]:
        if self.tls:
            return {"port": self.port, "tls": True}
        return {"port": self.port}

    def topics(self) -> list[str]:
        return []
