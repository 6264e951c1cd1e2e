"""The web app's edge (:class:`p2pinfer.web.app.Edge`): a route of fixed
path has its endpoint called by the edge itself, anything else goes
through Starlette's own stack; both must answer alike (status, body,
headers, the exception handlers, the body rules, the count in metrics).

Each case is asked twice: on a fixed path (called directly) and on a path
with a parameter (Starlette's routing), with the same endpoint.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from p2pinfer.errors import InvalidParams, P2PInferError
from p2pinfer.web.app import Edge, IndexedRouter
from p2pinfer.web.inputs import current_source
from p2pinfer.web.responses import as_error, json_error
from p2pinfer.web.security import BodyLimit


class Counts:
    def __init__(self) -> None:
        self.seen: Counter[tuple[str, str, str]] = Counter()

    def count_request(self, service: str, method: str, status: str, n: int = 1) -> None:
        self.seen[(service, method, status)] += n


async def ok(request: Request) -> Response:
    body = await request.body()
    return JSONResponse({"bytes": len(body), "source": current_source.get()},
                        headers={"x-content-type-options": "kept"})


async def refused(request: Request) -> Response:
    raise InvalidParams("prompt: must be a string", data={"field": "prompt"})


async def starlette_error(request: Request) -> Response:
    raise HTTPException(status_code=409, detail="taken")


async def broken(request: Request) -> Response:
    raise RuntimeError("a bug")


ENDPOINTS = {"ok": ok, "refused": refused, "starlette": starlette_error, "broken": broken}


def edge(counts: Counts) -> Edge:
    routes = []
    for name, endpoint in ENDPOINTS.items():
        routes.append(Route(f"/fixed/{name}", endpoint, methods=["POST"]))
        routes.append(Route(f"/param/{{which}}/{name}", endpoint, methods=["POST"]))

    async def on_error(request: Request, exc: Exception) -> Response:
        return json_error(as_error(exc))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    handlers: dict[Any, Any] = {P2PInferError: on_error, HTTPException: on_http,
                                Exception: on_error}
    router = IndexedRouter(routes)
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.router = router

    def render(scope: Any, err: P2PInferError) -> Response:
        return json_error(err)

    return Edge(app, router, counts, body=BodyLimit(limit=100, timeout=5.0), render=render,
                handlers=handlers, hsts=True)


def both(name: str) -> list[str]:
    return [f"/fixed/{name}", f"/param/x/{name}"]


async def ask(app: Any, path: str, *, raise_errors: bool = False,
              **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_errors,
                                    client=("198.51.100.4", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://web") as http:
        return await http.post(path, **kwargs)


def test_fixed_paths_are_called_directly() -> None:
    router = edge(Counts()).router
    scope = {"type": "http", "path": "/fixed/ok", "method": "POST", "root_path": ""}
    assert router.exact_route(scope) is not None and scope["route"].path == "/fixed/ok"
    assert router.exact_route({"type": "http", "path": "/param/x/ok", "method": "POST"}) is None
    # a wrong method goes to Starlette, for its 405
    assert router.exact_route({"type": "http", "path": "/fixed/ok", "method": "GET"}) is None


@pytest.mark.parametrize("path", both("ok"))
async def test_an_answer_gets_headers_source_and_a_count(path: str) -> None:
    counts = Counts()
    r = await ask(edge(counts), path, content=b"x" * 40)
    assert r.status_code == 200
    assert r.json() == {"bytes": 40, "source": "ip:198.51.100.4"}
    assert r.headers["x-content-type-options"] == "kept"  # the response's own value
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["strict-transport-security"].startswith("max-age=")
    assert "connection" not in r.headers
    template = "/fixed/ok" if path.startswith("/fixed") else "/param/:which/ok"
    assert counts.seen == {("web", f"POST:{template}", "success"): 1}


@pytest.mark.parametrize("path", both("refused"))
async def test_an_error_of_ours_is_answered_by_its_handler(path: str) -> None:
    counts = Counts()
    r = await ask(edge(counts), path, raise_errors=True)
    assert r.status_code == 422 and r.json()["error"]["type"] == "InvalidParams"
    assert r.headers["content-security-policy"]
    assert list(counts.seen.values()) == [1]
    assert next(iter(counts.seen))[2] == "client_error"


@pytest.mark.parametrize("path", both("starlette"))
async def test_an_http_exception_is_answered_by_its_handler(path: str) -> None:
    r = await ask(edge(Counts()), path, raise_errors=True)
    assert (r.status_code, r.json()) == (409, {"detail": "taken"})


@pytest.mark.parametrize("path", both("broken"))
async def test_a_bug_is_answered_then_raised_for_the_server_to_log(path: str) -> None:
    counts = Counts()
    r = await ask(edge(counts), path)
    assert r.status_code == 500 and r.json()["error"]["type"] == "HandlerError", r.text
    assert r.headers["x-content-type-options"] == "nosniff"
    assert next(iter(counts.seen))[2] == "error"
    with pytest.raises(RuntimeError, match="a bug"):
        await ask(edge(counts), path, raise_errors=True)


@pytest.mark.parametrize("path", both("ok"))
async def test_bodies_over_the_limit_close_the_connection(path: str) -> None:
    counts = Counts()
    # declared: refused before anything is read
    r = await ask(edge(counts), path, content=b"x" * 101)
    assert r.status_code == 413 and r.json()["error"]["type"] == "FrameTooLarge"
    assert r.headers["connection"] == "close" and r.headers["x-frame-options"] == "DENY"

    # chunked (no length): refused while reading
    async def pieces() -> Any:
        for _ in range(5):
            yield b"y" * 30

    r = await ask(edge(counts), path, content=pieces())
    assert r.status_code == 413 and r.headers["connection"] == "close"
    assert sum(counts.seen.values()) == 2
