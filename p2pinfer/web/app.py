"""The ASGI application of the web role: every route, the error handlers of
each dialect, and the middleware stack.

Every request enters through :class:`Edge` (the client's address, request
metrics with the route template, never the raw path, security headers, the
body limit), which calls the endpoint of a route of fixed path itself and
hands anything else to Starlette (routing and exception handlers).
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
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
from .security import BodyLimit, BodyReader, add_security_headers, security_headers

if TYPE_CHECKING:  # pragma: no cover
    from .site import WebSite

__all__ = ["Edge", "IndexedRouter", "RequestCounter", "build_app", "method_label"]

Scope = MutableMapping[str, Any]

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


class RequestCounter(Protocol):
    """Where HTTP requests are counted: the node-wide metrics in the node,
    a batch handed to the node in a front-door process."""

    def count_request(self, service: str, method: str, status: str, n: int = 1) -> None: ...


Handler = Callable[[Request, Exception], Awaitable[Response]]


class Edge:
    """Where every HTTP request enters the app, in one ASGI frame:

    - the client's address, for throttles and audit
      (:data:`~p2pinfer.web.inputs.current_source`);
    - its count in ``metrics`` (service ``web``, method = HTTP method and
      route template, never the raw path; status = outcome), made before
      the client can see the end of the response;
    - the security headers (:func:`~p2pinfer.web.security.security_headers`);
    - the body rules (:class:`~p2pinfer.web.security.BodyLimit`): a
      declared length over the limit is refused before anything is read;
    - a route of fixed path (:meth:`IndexedRouter.exact_route`: the API,
      OpenAI and Ollama routes) has its endpoint called here, with the
      app's exception handlers, as Starlette's own stack would; anything
      else goes through ``app`` (Starlette: routing, path parameters,
      static files, 404 and 405).

    Each layer of ASGI middleware is a coroutine frame that every resumption
    of the handler passes through and a wrapper every message of the
    response passes through: folding the web role's four layers into this
    one and calling the endpoint here (Starlette's app, its two middleware,
    the router and the route's wrappers skipped) cut a front door's CPU per
    whole answer by 12-20 % (benchmarks/RESULTS.md, HTTP front door).

    Args:
        app: the Starlette app.
        router: its router.
        metrics: where requests are counted.
        body: the body rules.
        render: the error response for a request refused here (its dialect).
        handlers: exception class -> handler, as given to Starlette; the one
            for ``Exception`` answers and re-raises, so the server logs it,
            as Starlette's ``ServerErrorMiddleware`` does.
        hsts: add ``Strict-Transport-Security`` (TLS).
    """

    def __init__(self, app: Starlette, router: IndexedRouter, metrics: RequestCounter, *,
                 body: BodyLimit, render: Callable[[Scope, P2PInferError], Response],
                 handlers: dict[type[Exception], Handler], hsts: bool) -> None:
        self.app = app
        self.router = router
        self.metrics = metrics
        self.body = body
        self.render = render
        self.handlers = handlers
        self.headers = security_headers(hsts=hsts)

    def _count(self, scope: Scope, status: int) -> None:
        template = getattr(scope.get("route"), "path", None)
        try:
            self.metrics.count_request(
                "web", method_label(scope.get("method", "GET"), template), _status_label(status))
        except Exception:  # metrics must never fail a request
            log.exception("counting a web request failed")

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        token = current_source.set(f"ip:{throttle_address(client[0])}" if client else None)
        reader = BodyReader(receive, self.body)
        status = 500
        counted = False

        async def respond(message: MutableMapping[str, Any]) -> None:
            nonlocal status, counted
            kind = message["type"]
            if kind == "http.response.start":
                status = int(message["status"])
                headers = add_security_headers(list(message.get("headers") or ()),
                                               self.headers)
                if reader.refused:
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            elif kind == "http.response.body" and not counted \
                    and not message.get("more_body"):
                counted = True
                self._count(scope, status)
            await send(message)

        try:
            if self.body.declared_too_big(scope):
                reader.refused = True
                await self.render(scope, self.body.error())(scope, receive, respond)
                return
            route = self.router.exact_route(scope)
            if route is None:
                await self.app(scope, reader, respond)
            else:
                await self._endpoint(route, scope, reader, respond)
        finally:
            if not counted:
                self._count(scope, status)
            current_source.reset(token)

    async def _endpoint(self, route: Route, scope: Scope, receive: Any, send: Any) -> None:
        """``route``'s endpoint, as Starlette's app, router and
        ``request_response`` would run it."""
        scope["app"] = self.app
        request = Request(scope, receive, send)
        started = False

        async def sender(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            response = await route.endpoint(request)
            await response(scope, receive, sender)
        except Exception as exc:
            handler = _handler_for(self.handlers, exc)
            if handler is None or started:
                raise
            response = await handler(request, exc)
            await response(scope, receive, sender)
            if not isinstance(exc, P2PInferError | HTTPException):
                raise  # an unexpected error: answered, and logged by the server
            exc.__traceback__ = None  # instances may be reused: drop the frames


def _handler_for(handlers: dict[type[Exception], Handler], exc: Exception) -> Handler | None:
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None


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
            # (Route wraps a plain function's endpoint in its own ASGI app;
            # a coroutine function with no route middleware is what that
            # app would await, so Edge may await it itself)
            route.direct = (  # type: ignore[attr-defined]
                inspect.iscoroutinefunction(route.endpoint)
                and route.app is not route.endpoint and not getattr(route, "middleware", None))
            self.exact.setdefault(route.path, []).append(route)
        for path in shadowed:
            del self.exact[path]

    def _full_match(self, scope: MutableMapping[str, Any]) -> Route | None:
        """The indexed route that fully matches ``scope``, which then names
        it as Starlette's routing would; None if none does."""
        if scope["type"] != "http" or scope.get("root_path"):
            return None
        for route in self.exact.get(scope["path"], ()):
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                scope.setdefault("router", self)
                scope["route"] = route
                scope.update(child_scope)
                return route
        return None

    def exact_route(self, scope: MutableMapping[str, Any]) -> Route | None:
        """The route of fixed path that fully matches ``scope`` (see
        :meth:`_full_match`), if its endpoint is a coroutine function that
        :class:`Edge` may call directly; else None."""
        route = self._full_match(scope)
        return route if route is not None and route.direct else None  # type: ignore[attr-defined]

    async def app(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        route = self._full_match(scope)
        if route is not None:
            await route.handle(scope, receive, send)
        else:
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
    router = IndexedRouter(routes)
    app = Starlette(routes=routes, exception_handlers={
        P2PInferError: on_error, HTTPException: on_http_exception, Exception: on_error})
    app.router = router

    def early_error(scope: Scope, err: P2PInferError) -> Response:
        return _dialect_error(web, Request(scope), err)

    return Edge(app, router, web.metrics,
                body=BodyLimit(limit=web.settings.max_body_bytes,
                               timeout=web.settings.body_timeout),
                render=early_error, handlers=dict(app.exception_handlers), hsts=web.tls)
