"""The SDK's HTTP transport: the web role's REST API, spoken with httpx.

Each operation is one route of the REST API (:data:`ROUTES`): its method,
its path, where its parameters go (a JSON body or the query string) and the
credential as a header (``Authorization: Bearer <token>`` or ``X-API-Key``).
Answers come back in the RPC API's shape; ``/v1/embeddings``, which answers
in OpenAI's, is converted.

Errors come back as ``{"error": {"code", "type", "message", "data"}}`` with
the matching HTTP status; the code rebuilds the same error class the
peer-to-peer path raises. ``POST /api/inference`` with ``"stream": true``
answers NDJSON: ``{"delta": "..."}`` lines, then one ``{"done": true, ...}``
line carrying the trailer (model, finish_reason, usage, request_id, ...).
"""

from __future__ import annotations

import json
import ssl
import string
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from ..errors import (
    ConfigError,
    InvalidParams,
    MalformedBackendResponse,
    P2PInferError,
    PeerUnavailable,
    UnknownMethod,
    error_from_code,
)
from . import AnswerStream, Credential, Transport, text_chunk

__all__ = ["ROUTES", "HttpAnswer", "HttpRoute", "HttpTransport", "error_from_response",
           "request_json", "unreachable_reason"]


@dataclass(frozen=True)
class HttpRoute:
    """One REST route an operation takes.

    ``path`` may name parameters (``/api/auth/api-keys/{key_id}``): they
    leave the parameters for the path. The others go where ``send`` says:
    ``"body"`` (a JSON body, ``{}`` when there are none), ``"optional-body"``
    (a JSON body only when there are any), ``"query"`` (the query string)
    or ``"nothing"`` (they are not sent).
    """

    method: str
    path: str
    send: Literal["body", "optional-body", "query", "nothing"] = "nothing"

    @property
    def path_params(self) -> tuple[str, ...]:
        """The parameters the path names, in order."""
        return tuple(name for _, name, _, _ in string.Formatter().parse(self.path) if name)


#: The routes of each operation, the first whose path parameters are all
#: given wins. system_health has none: the REST API serves the gateway's
#: health only.
ROUTES: dict[str, tuple[HttpRoute, ...]] = {
    "embed": (HttpRoute("POST", "/v1/embeddings", "body"),),
    "models": (HttpRoute("GET", "/api/models"),),
    "quota": (HttpRoute("GET", "/api/quota"),),
    "usage": (HttpRoute("GET", "/api/usage", "query"),),
    "health": (HttpRoute("GET", "/api/health"),),
    "register": (HttpRoute("POST", "/api/auth/register", "body"),),
    "login": (HttpRoute("POST", "/api/auth/login", "body"),),
    "refresh": (HttpRoute("POST", "/api/auth/refresh", "body"),),
    # a refresh token travels in the body; a session token as the header
    "logout": (HttpRoute("POST", "/api/auth/logout", "optional-body"),),
    "logout_everywhere": (HttpRoute("POST", "/api/auth/logout-all"),),
    "change_password": (HttpRoute("POST", "/api/auth/password", "body"),),
    "me": (HttpRoute("GET", "/api/auth/me"),),
    "create_api_key": (HttpRoute("POST", "/api/auth/api-keys", "body"),),
    "api_keys": (HttpRoute("GET", "/api/auth/api-keys"),),
    "revoke_api_key": (HttpRoute("DELETE", "/api/auth/api-keys/{key_id}"),),
    "export_data": (HttpRoute("GET", "/api/auth/export", "query"),),
    # an admin erases another account by id; a user erases their own with the password
    "erase_account": (HttpRoute("DELETE", "/api/auth/users/{user_id}"),
                      HttpRoute("DELETE", "/api/auth/me", "body")),
}


def _embeddings(data: Any) -> dict[str, Any]:
    """OpenAI's embedding list as ``processEmbeddingRequest`` answers it."""
    return {"embeddings": [item["embedding"] for item in data["data"]],
            "model": data.get("model"), "usage": data.get("usage"),
            "request_id": data.get("request_id")}


#: Operations whose REST answer differs from the RPC result, and the conversion.
RESULTS: dict[str, Callable[[Any], Any]] = {"embed": _embeddings}


def unreachable_reason(exc: BaseException) -> str:
    """Why an HTTP request could not be made, for the PeerUnavailable message:
    the TLS verification failure if there is one in the chain (httpx on trio
    reports it as an empty ConnectError), else the error's own text."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return f"TLS: {seen.args[1] if len(seen.args) > 1 else seen}"
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__


def error_from_response(status: int, body: bytes) -> P2PInferError:
    """The error an HTTP error answer stands for (the same class and code as
    over RPC when the body is the web role's ``{"error": {...}}``)."""
    try:
        data = json.loads(body)
        err = data["error"]
        exc = error_from_code(int(err["code"]), str(err.get("message", "")), err.get("data"))
    except (ValueError, KeyError, TypeError):
        exc = P2PInferError(f"HTTP {status}: {body[:200].decode(errors='replace')}")
    exc.data.setdefault("http_status", status)
    return exc


async def request_json(http: httpx.AsyncClient, method: str, path: str, *,
                       headers: dict[str, str], body: dict[str, Any] | None = None,
                       params: dict[str, str] | None = None) -> Any:
    """One JSON request; an error answer raises the matching P2PInferError.

    Raises:
        PeerUnavailable: the server cannot be reached.
        MalformedBackendResponse: the answer is not JSON.
    """
    try:
        resp = await http.request(method, path, headers=headers, params=params,
                                  json=body if body is not None else None)
    except httpx.HTTPError as exc:
        raise PeerUnavailable(f"cannot reach {http.base_url}: {unreachable_reason(exc)}") \
                from exc
    if resp.status_code >= 400:
        raise error_from_response(resp.status_code, resp.content)
    try:
        return resp.json()
    except ValueError as exc:
        raise MalformedBackendResponse(
            f"{method} {path}: the answer is not JSON ({resp.content[:80]!r})") from exc


def _ssl_verify(verify: bool | str) -> bool | ssl.SSLContext:
    """httpx's ``verify``: a CA bundle path becomes an SSL context trusting it."""
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    return verify


class HttpAnswer(AnswerStream):
    """One streamed ``POST /api/inference``."""

    def __init__(self, resp: httpx.Response) -> None:
        self._resp = resp
        self._lines: AsyncIterator[str] = resp.aiter_lines()
        self._done = False
        self.trailer: dict[str, Any] | None = None

    @classmethod
    async def open(cls, http: httpx.AsyncClient, request: dict[str, Any],
                   headers: dict[str, str]) -> HttpAnswer:
        """Send ``request`` (streamed) and return its answer once the server
        has accepted it.

        Raises:
            PeerUnavailable: the server cannot be reached.
            P2PInferError: the error the server answered with.
        """
        req = http.build_request("POST", "/api/inference", json={**request, "stream": True},
                                 headers=headers)
        try:
            resp = await http.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise PeerUnavailable(f"cannot reach {http.base_url}: {unreachable_reason(exc)}") \
                from exc
        if resp.status_code >= 400:
            body = await resp.aread()
            await resp.aclose()
            raise error_from_response(resp.status_code, body)
        return cls(resp)

    async def __anext__(self) -> dict[str, Any]:
        if self._done:
            raise StopAsyncIteration
        async for line in self._lines:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError as exc:
                raise MalformedBackendResponse(f"not NDJSON: {line[:100]!r}") from exc
            if not isinstance(event, dict):
                raise MalformedBackendResponse(f"not an NDJSON object: {line[:100]!r}")
            if "error" in event:
                err = event["error"]
                raise error_from_code(int(err.get("code", 1)), str(err.get("message", "")),
                                      err.get("data"))
            if event.get("done"):
                self._done = True
                self.trailer = event
                raise StopAsyncIteration
            return text_chunk(event)
        raise MalformedBackendResponse("the stream ended before its final line")

    async def aclose(self) -> None:
        """Close the HTTP response (cancels the request if it is still running)."""
        await self._resp.aclose()


class HttpTransport(Transport):
    """The REST API of one web node, over httpx.

    Args:
        base_url: the web node's URL (``http://host:3000``).
        verify: HTTPS certificate check: True (the system's CAs), a CA
            bundle path, or False.
        transport: an ``httpx`` transport to send requests through (tests
            use ``httpx.MockTransport``).

    Raises:
        ConfigError: no ``base_url``.
    """

    def __init__(self, base_url: str, *, verify: bool | str = True,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not base_url:
            raise ConfigError("the HTTP transport needs a base_url")
        self.base_url = base_url
        self.verify = verify
        self.transport = transport
        self._http: httpx.AsyncClient | None = None

    async def connect(self, stack: AsyncExitStack) -> None:
        """Open the httpx client (its connection pool)."""
        self._http = await stack.enter_async_context(httpx.AsyncClient(
            base_url=self.base_url.rstrip("/"), verify=_ssl_verify(self.verify),
            timeout=None, transport=self.transport))
        stack.callback(setattr, self, "_http", None)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("use the client as `async with Client(...) as client` "
                               "(a transport: `async with transport`)")
        return self._http

    async def call(self, op: str, params: dict[str, Any],
                   credential: Credential | None) -> Any:
        """Send ``op`` to its route (see :data:`ROUTES`).

        Raises:
            UnknownMethod: ``system_health`` (the REST API has no such
                route), or an operation this transport does not know.
            InvalidParams: a parameter the route's path names is missing.
        """
        if op == "system_health":
            raise UnknownMethod("the HTTP API serves the gateway's health only (health())")
        routes = ROUTES.get(op)
        if routes is None:
            raise UnknownMethod(f"the HTTP transport has no operation {op!r}")
        route = next((r for r in routes
                      if all(params.get(name) is not None for name in r.path_params)), None)
        if route is None:
            missing = routes[-1].path_params[0]
            raise InvalidParams(f"{missing}: missing", data={"field": missing})
        rest = {k: v for k, v in params.items() if k not in route.path_params}
        path = route.path.format(**{name: params.get(name) for name in route.path_params})
        body: dict[str, Any] | None = None
        query: dict[str, str] | None = None
        if route.send == "body" or (route.send == "optional-body" and rest):
            body = rest
        elif route.send == "query" and rest:
            query = rest
        data = await request_json(self._client(), route.method, path,
                                  headers=credential.headers() if credential else {},
                                  body=body, params=query)
        convert = RESULTS.get(op)
        return convert(data) if convert is not None else data

    async def open_answer(self, request: dict[str, Any],
                          credential: Credential) -> AnswerStream:
        """``POST /api/inference`` with ``"stream": true``, read as it arrives."""
        return await HttpAnswer.open(self._client(), request, credential.headers())

    async def peers(self) -> list[dict[str, Any]]:
        """Not over HTTP.

        Raises:
            ConfigError: always (listing peers needs peer-to-peer access).
        """
        raise ConfigError("listing peers needs peer-to-peer access (bootstrap=...)")
