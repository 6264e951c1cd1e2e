"""The ASGI application of the web role: every route, the error handlers of
each dialect, and the middleware stack.

Outermost first: request metrics (``node.metrics.count_request`` with the
route template, never the raw path), security headers, the body size
limit, then Starlette (routing and exception handlers).
"""

from __future__ import annotations

import logging
import re
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Mount, Route, Router
from starlette.staticfiles import StaticFiles

from ..errors import InvalidParams, NotFound, P2PInferError, UnknownMethod
from ..rpc.server import throttle_address
from .api import api_routes
from .inputs import current_source
from .ollama_api import OLLAMA_PATHS, ollama_routes
from .openai_api import openai_routes
from .openapi import openapi_document
from .privacy import privacy_routes
from .responses import as_error, json_error, ollama_error, openai_error
from .security import BodyLimit, SecurityHeaders

if TYPE_CHECKING:  # pragma: no cover
    from .site import WebSite

__all__ = ["ClientSource", "IndexedRouter", "RequestCounter", "RequestMetrics", "build_app",
           "method_label"]

log = logging.getLogger(__name__)

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?\}")


def method_label(method: str, template: str | None) -> str:
    """The ``method`` label of a request: ``POST:/api/inference``,
    ``DELETE:/api/auth/api-keys/:key_id``, ``GET:_unmatched``."""
    verb = method if method in _METHODS else "OTHER"
    if template is None:
        return f"{verb}:_unmatched"
    path = _PARAM.sub(r":\1", template)
    return f"{verb}:{path}"


def _status_label(status: int) -> str:
    if status < 400:
        return "success"
    if status in (401, 403):
        return "denied"
    if status == 429:
        return "rate_limited"
    if status < 500:
        return "client_error"
    if status == 504:
        return "timeout"
    return "error"


class ClientSource:
    """ASGI middleware: records the client's address for the request
    (:data:`~p2pinfer.web.inputs.current_source`)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        client = scope.get("client") if scope["type"] == "http" else None
        token = current_source.set(f"ip:{throttle_address(client[0])}" if client else None)
        try:
            await self.app(scope, receive, send)
        finally:
            current_source.reset(token)


class RequestCounter(Protocol):
    """Where HTTP requests are counted: the node-wide metrics in the node,
    a batch handed to the node in a front-door process."""

    def count_request(self, service: str, method: str, status: str, n: int = 1) -> None: ...


class RequestMetrics:
    """ASGI middleware: counts each HTTP request in ``metrics`` (service
    ``web``, method = HTTP method and route template, status = outcome)."""

    def __init__(self, app: Any, metrics: RequestCounter) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        counted = False

        def count() -> None:
            nonlocal counted
            counted = True
            template = getattr(scope.get("route"), "path", None)
            try:
                self.metrics.count_request(
                    "web", method_label(scope.get("method", "GET"), template),
                    _status_label(status))
            except Exception:  # metrics must never fail a request
                log.exception("counting a web request failed")

        async def observe(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body") \
                    and not counted:
                count()  # before the client can see the end of the response
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            if not counted:
                count()


class IndexedRouter(Router):
    """Starlette's router, finding a route of a fixed path (no parameters)
    by one dict lookup instead of trying every route in turn (the chat
    route was the nineteenth tried).

    It picks the route Starlette's would: a fixed path is indexed only when
    no route listed before it matches that path at all (checked here, when
    the router is built), and a request the index cannot answer with a
    full match (a wrong method: 405) goes through Starlette's own search.
    """

    def __init__(self, routes: list[BaseRoute]) -> None:
        super().__init__(routes)
        self.exact: dict[str, list[Route]] = {}
        shadowed: set[str] = set()
        for i, route in enumerate(self.routes):
            if not isinstance(route, Route) or route.param_convertors:
                continue
            probes = [{"type": "http", "path": route.path, "root_path": "", "method": m}
                      for m in sorted(route.methods or {"GET"})]
            if any(other.matches(probe)[0] is not Match.NONE
                   for other in self.routes[:i]
                   if not (isinstance(other, Route) and other.path == route.path)
                   for probe in probes):
                shadowed.add(route.path)
            self.exact.setdefault(route.path, []).append(route)
        for path in shadowed:
            del self.exact[path]

    async def app(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            for route in self.exact.get(scope["path"], ()):
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope.setdefault("router", self)
                    scope["route"] = route
                    scope.update(child_scope)
                    await route.handle(scope, receive, send)
                    return
        await super().app(scope, receive, send)


def _dialect_error(web: WebSite, request: Request, err: P2PInferError) -> Response:
    path = request.url.path
    if path.startswith("/v1/"):
        return openai_error(err)
    if path in OLLAMA_PATHS:
        return ollama_error(err)
    if path.startswith("/api/") or path in ("/api", "/openapi.json"):
        return json_error(err)
    return web.pages.error_page(request, err)


def build_app(web: WebSite) -> Any:
    """The whole ASGI app of ``web`` (middleware included)."""

    async def on_error(request: Request, exc: Exception) -> Response:
        return _dialect_error(web, request, as_error(exc))

    async def on_http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        err: P2PInferError
        if exc.status_code == 404:
            err = NotFound(f"no such page or route: {request.url.path[:200]}")
        elif exc.status_code == 405:
            err = UnknownMethod(f"{request.method} is not allowed on {request.url.path[:200]}")
            response = _dialect_error(web, request, err)
            response.status_code = 405
            if exc.headers:
                response.headers.update(exc.headers)
            return response
        else:
            err = InvalidParams(str(exc.detail)[:200])
        return _dialect_error(web, request, err)

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(openapi_document(web.url))

    async def docs(request: Request) -> Response:
        session = await web.sessions.load(request)
        return web.pages.render(request, "docs.html", {"doc": openapi_document(web.url)},
                                session=session)

    routes: list[BaseRoute] = [
        *api_routes(web),
        *openai_routes(web),
        *ollama_routes(web),
        *web.pages.routes(),
        *privacy_routes(web),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Mount("/static", app=StaticFiles(packages=[("p2pinfer.web", "static")]),
              name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={
        P2PInferError: on_error, HTTPException: on_http_exception, Exception: on_error})
    app.router = IndexedRouter(routes)

    def early_error(scope: dict[str, Any], err: P2PInferError) -> Response:
        return _dialect_error(web, Request(scope), err)

    limited = BodyLimit(app, limit=web.settings.max_body_bytes, render=early_error,
                        timeout=web.settings.body_timeout)
    return ClientSource(RequestMetrics(SecurityHeaders(limited, hsts=web.tls),
                                       web.metrics))
