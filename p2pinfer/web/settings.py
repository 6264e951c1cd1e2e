"""``[web]`` configuration (env: ``WEB_SERVICE_PORT``).

    [web]
    host = "127.0.0.1"          # where the HTTP server listens ("0.0.0.0" for the LAN)
    port = 3000                 # WEB_SERVICE_PORT; 0 picks a free port (tests)
    max_body_bytes = 1048576    # larger request bodies get 413
    body_timeout = 30.0         # seconds a request body may take to arrive, then 422
    idle_timeout = 30.0         # seconds a connection may stay idle, or take to send a
                                # request's line and headers, before it is closed
    request_timeout = 300.0     # seconds an inference request may take end to end
    call_timeout = 15.0         # seconds for any other call to an auth or gateway node
    models_ttl = 2.0            # seconds the swarm's model list is reused
    secure_cookies = false      # mark cookies Secure (always on once TLS serves)
    session_cookie = "p2p_session"
    title = "p2pinfer"          # shown in the page header
    tls_cert = ""               # P2PINFER_TLS_CERT: PEM certificate (chain): serve HTTPS
    tls_key = ""                # P2PINFER_TLS_KEY: its private key
    tls_self_signed = false     # P2PINFER_TLS_SELF_SIGNED: no cert given: make one in <home>/tls
    tls_hosts = []              # extra names / addresses for the self-signed certificate
    redirect_port = -1          # P2PINFER_HTTP_REDIRECT_PORT: >= 0: plain HTTP that redirects
    workers = "auto"            # P2PINFER_WEB_WORKERS: front-door processes (uvicorn) serving
                                # the port: "auto" one per core the node may use, at most
                                # 8; a number (1-64); 0 serves inside the node (Hypercorn)

Relative TLS paths are relative to the node's home. See :mod:`.tls`.
Every value is checked when the role is built; a bad one raises
:class:`~p2pinfer.errors.ConfigError` naming it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import NodeConfig, Section
from ..errors import ConfigError

__all__ = ["MAX_AUTO_WORKERS", "WebSettings", "auto_workers"]

_KEYS = {"host", "port", "max_body_bytes", "body_timeout", "idle_timeout", "request_timeout",
         "call_timeout",
         "models_ttl", "secure_cookies", "session_cookie", "title", "tls_cert", "tls_key",
         "tls_self_signed", "tls_hosts", "redirect_port", "workers"}
MAX_WORKERS = 64
# "auto" runs one front door per core, up to this many: a node's gateway is
# one process, which this many front doors already keep busy (a machine
# with more cores runs more gateway nodes; quotas hold across them).
MAX_AUTO_WORKERS = 8
_COOKIE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


@dataclass(frozen=True)
class WebSettings:
    """Validated ``[web]`` settings (see the module docstring)."""

    host: str = "127.0.0.1"
    port: int = 3000
    max_body_bytes: int = 1024 * 1024
    body_timeout: float = 30.0
    idle_timeout: float = 30.0
    request_timeout: float = 300.0
    call_timeout: float = 15.0
    models_ttl: float = 2.0
    secure_cookies: bool = False
    session_cookie: str = "p2p_session"
    title: str = "p2pinfer"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_self_signed: bool = False
    tls_hosts: tuple[str, ...] = field(default=())
    redirect_port: int | None = None
    workers: int = 0  # resolved: from_config turns "auto" into a number

    @property
    def tls(self) -> bool:
        """Whether HTTPS is served (a certificate, or a self-signed one)."""
        return self.tls_cert is not None or self.tls_self_signed

    @property
    def refresh_cookie(self) -> str:
        return f"{self.session_cookie}_refresh"

    @property
    def csrf_cookie(self) -> str:
        return f"{self.session_cookie}_csrf"

    def to_wire(self) -> dict[str, Any]:
        """These settings as JSON-safe values (paths as strings), for a
        front-door process."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = (str(value) if isinstance(value, Path)
                           else list(value) if isinstance(value, tuple) else value)
        return out

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> WebSettings:
        """The inverse of :meth:`to_wire`."""
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name not in known:
                raise ConfigError(f"web.{name}: unknown key")
            if name in ("tls_cert", "tls_key"):
                value = Path(value) if value else None
            elif isinstance(value, list):
                value = tuple(value)
            values[name] = value
        return cls(**values)

    @classmethod
    def from_config(cls, config: NodeConfig) -> WebSettings:
        s = config.section("web")
        s.reject_unknown(_KEYS)
        cookie = s.get_str("session_cookie", "p2p_session")
        if not _COOKIE_NAME.match(cookie):
            raise ConfigError(f"web.session_cookie: letters, digits, _ and - only, got {cookie!r}")
        host = s.get_str("host", "127.0.0.1")
        if not host:
            raise ConfigError("web.host: must not be empty")
        return cls(
            host=host,
            port=s.get_int("port", 3000, minimum=0, maximum=65535),
            max_body_bytes=s.get_int("max_body_bytes", 1024 * 1024, minimum=1024,
                                     maximum=256 * 1024 * 1024),
            body_timeout=s.get_float("body_timeout", 30.0, minimum=0.5, maximum=3600),
            idle_timeout=s.get_float("idle_timeout", 30.0, minimum=0.5, maximum=3600),
            request_timeout=s.get_float("request_timeout", 300.0, minimum=1, maximum=86400),
            call_timeout=s.get_float("call_timeout", 15.0, minimum=0.5, maximum=600),
            models_ttl=s.get_float("models_ttl", 2.0, minimum=0, maximum=3600),
            secure_cookies=s.get_bool("secure_cookies", False),
            session_cookie=cookie,
            title=s.get_str("title", "p2pinfer")[:60],
            workers=_workers(s),
            **_tls(s, config.home),
        )


def _workers(s: Section) -> int:
    """``workers``: "auto" (the default) or a number from 0 to MAX_WORKERS."""
    value = s.raw("workers", "auto")
    if isinstance(value, str) and value.strip().lower() == "auto":
        return auto_workers()
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        raise ConfigError(f'web.workers: "auto" or a number from 0 to {MAX_WORKERS}, '
                          f"got {value!r}")
    return s.get_int("workers", 0, minimum=0, maximum=MAX_WORKERS)


def auto_workers() -> int:
    """One front door per core this process may run on, at most
    :data:`MAX_AUTO_WORKERS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_AUTO_WORKERS))


def _tls(s: Section, home: Path) -> dict[str, Any]:
    def path(key: str) -> Path | None:
        value = s.get_optional_str(key)
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else home / p

    cert, key = path("tls_cert"), path("tls_key")
    if (cert is None) != (key is None):
        raise ConfigError("web.tls_key: give both tls_cert and tls_key, or neither")
    redirect = s.get_int("redirect_port", -1, minimum=-1, maximum=65535)
    self_signed = s.get_bool("tls_self_signed", False)
    if redirect >= 0 and cert is None and not self_signed:
        raise ConfigError("web.redirect_port: redirects to HTTPS, which needs tls_cert and "
                          "tls_key (or tls_self_signed = true)")
    return {"tls_cert": cert, "tls_key": key, "tls_self_signed": self_signed,
            "tls_hosts": tuple(s.get_str_list("tls_hosts")),
            "redirect_port": None if redirect < 0 else redirect}
