"""The REST API (docs/http-api.md), with what the SDK's HTTP mode uses.

Credentials (see :mod:`~p2pinfer.web.credentials`): ``X-API-Key`` or
``Authorization: Bearer <API key or session token>``. Errors are
``{"error": {"code", "type", "message", "data"}}`` with the error's status.

====================================  ===============  ===============================
route                                 credentials      answer
====================================  ===============  ===============================
POST /api/auth/register               none             201 user
POST /api/auth/login                  none             session (access + refresh token)
POST /api/auth/refresh                none             session (rotated)
POST /api/auth/logout                 session token    {session_id, revoked, ...}
                                      (or body
                                      refresh_token)
GET  /api/auth/me                     key or token     user
POST /api/auth/api-keys               session token    201 {api_key (shown once), key_id, ...}
GET  /api/auth/api-keys               key or token     {keys: [...]}
DELETE /api/auth/api-keys/{key_id}    session token    {key_id, revoked_at, already_revoked}
POST /api/inference                   key or token     {text, model, finish_reason, usage,
                                                       request_id, worker, latency_ms, ...};
                                                       with "stream": true, NDJSON lines
                                                       {"delta"} then {"done": true, ...}
GET  /api/models                      key or token     {models: [...]}
GET  /api/usage?since=&until=         key or token     {user_id, usage: [{date, api_key_id,
                                                       requests, tokens}]}
GET  /api/quota                       key or token     the gateway's getUserQuota
GET  /api/health                      none             the gateway's getServiceHealth + web
====================================  ===============  ===============================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ..errors import AuthenticationRequired, InvalidParams, P2PInferError
from ..prompts import requested_model
from .credentials import credentials_from_headers
from .inputs import only_keys, read_json, source_of
from .responses import dumps
from .streaming import StreamResponse

if TYPE_CHECKING:  # pragma: no cover
    from .site import WebSite

__all__ = ["NdjsonDialect", "api_routes", "prepare_inference"]

# Shape checks only: the worker applies its own limits.
PROMPT_KEYS = ("prompt", "messages", "system", "model", "max_tokens", "maxTokens",
               "temperature", "top_p", "topP", "stop", "seed", "cache", "modelConfig",
               "format", "raw", "tools", "tool_choice", "parallel_tool_calls", "logprobs",
               "top_logprobs")
NO_STORE = {"Cache-Control": "no-store"}


class NdjsonDialect:
    """The REST stream: ``{"delta": ...}`` lines, then ``{"done": true, ...}``."""

    media_type = "application/x-ndjson"

    def start(self) -> bytes:
        return b""

    def delta(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> bytes:
        return dumps({"delta": text, **({"logprobs": logprobs} if logprobs else {})}) + b"\n"

    def done(self, trailer: dict[str, Any]) -> bytes:
        return dumps({"done": True, **trailer}) + b"\n"

    def error(self, err: P2PInferError) -> bytes:
        return dumps({"error": err.to_dict()}) + b"\n"


async def prepare_inference(web: WebSite, request: dict[str, Any],
                            auth: dict[str, str]) -> dict[str, Any]:
    """Check that the model the request names exists in the swarm
    (UnknownModel, 404); returns the request with the model's own name.

    The rest of the request is checked by the gateway that serves it
    (InvalidParams, after the credential: a client without a valid key
    learns nothing of what its request lacks), not here as well: parsing
    each request twice was ~7 % of a front door's CPU per answer."""
    model = requested_model(request)
    resolved = await web.upstream.catalog.resolve(model, auth)
    if resolved is not None and resolved != model:
        request = dict(request)
        if "model" in request:
            request["model"] = resolved
        elif isinstance(request.get("modelConfig"), dict):
            request["modelConfig"] = {**request["modelConfig"], "model": resolved}
    return request


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidParams(f"{field}: must be true or false", data={"field": field})
    return value


def api_routes(web: WebSite) -> list[Route]:
    """The REST routes of ``web``."""
    up = web.upstream

    def creds(request: Request, *, allow: tuple[str, ...] = ("api_key", "token")
              ) -> dict[str, str]:
        return credentials_from_headers(request.headers, allow=allow)

    async def register(request: Request) -> Response:
        body = only_keys(await read_json(request), ("username", "email", "password"))
        user = await up.call("auth", "registerUser", {**body, "source": source_of(request)})
        return JSONResponse(user, status_code=201, headers=NO_STORE)

    async def login(request: Request) -> Response:
        body = only_keys(await read_json(request), ("username", "email", "password"))
        session = await up.call("auth", "loginUser", {**body, "source": source_of(request)})
        return JSONResponse(session, headers=NO_STORE)

    async def refresh(request: Request) -> Response:
        body = only_keys(await read_json(request), ("refresh_token",))
        session = await up.call("auth", "refreshToken", {**body, "source": source_of(request)})
        return JSONResponse(session, headers=NO_STORE)

    async def logout(request: Request) -> Response:
        body = only_keys(await read_json(request, empty_ok=True), ("refresh_token",))
        params: dict[str, Any] = {"source": source_of(request)}
        if "refresh_token" in body:
            params["refresh_token"] = body["refresh_token"]
        elif request.headers.get("authorization"):
            params.update(creds(request, allow=("token",)))
        else:
            raise AuthenticationRequired("a session token (Authorization: Bearer) or a "
                                         "refresh_token is required",
                                         data={"field": "Authorization"})
        return JSONResponse(await up.call("auth", "logoutUser", params))

    async def logout_all(request: Request) -> Response:
        auth = creds(request, allow=("token",))
        only_keys(await read_json(request, empty_ok=True), ())
        return JSONResponse(await up.call("auth", "logoutEverywhere",
                                          {**auth, "source": source_of(request)}),
                            headers=NO_STORE)

    async def change_password(request: Request) -> Response:
        auth = creds(request, allow=("token",))
        body = only_keys(await read_json(request), ("current_password", "new_password"))
        session = await up.call("auth", "changePassword",
                                {**auth, **body, "source": source_of(request)})
        return JSONResponse(session, headers=NO_STORE)

    async def me(request: Request) -> Response:
        return JSONResponse(await up.call("auth", "getUser", creds(request)),
                            headers=NO_STORE)

    async def create_key(request: Request) -> Response:
        auth = creds(request, allow=("token",))
        body = only_keys(await read_json(request, empty_ok=True), ("name",))
        issued = await up.call("auth", "generateApiKey",
                               {**auth, **body, "source": source_of(request)})
        return JSONResponse(issued, status_code=201, headers=NO_STORE)

    async def list_keys(request: Request) -> Response:
        return JSONResponse(await up.call("auth", "listApiKeys", creds(request)),
                            headers=NO_STORE)

    async def revoke_key(request: Request) -> Response:
        auth = creds(request, allow=("token",))
        key_id = request.path_params.get("key_id")
        if key_id is None:
            key_id = request.query_params.get("key_id")
        if key_id is None:
            body = only_keys(await read_json(request, empty_ok=True), ("key_id",))
            key_id = body.get("key_id")
        if key_id is None:
            raise InvalidParams("key_id: required", data={"field": "key_id"})
        return JSONResponse(await up.call("auth", "revokeApiKey", {
            **auth, "key_id": key_id, "source": source_of(request)}))

    async def inference(request: Request) -> Response:
        auth = creds(request)
        body = only_keys(await read_json(request), (*PROMPT_KEYS, "stream"))
        stream = _bool(body.pop("stream", False), "stream")
        body = await prepare_inference(web, body, auth)
        call = await up.inference(body, auth, stream=stream)
        if stream:
            return StreamResponse(call, NdjsonDialect())
        try:
            text = await call.collect()
        finally:
            await call.aclose()
        scores = {"logprobs": call.logprobs} if body.get("logprobs") else {}
        return JSONResponse({"text": text, **call.trailer, **scores}, headers=NO_STORE)

    async def models(request: Request) -> Response:
        return JSONResponse({"models": await up.catalog.models(creds(request))})

    async def usage(request: Request) -> Response:
        query = only_keys(dict(request.query_params), ("since", "until"))
        result = await up.call("gateway", "getUsage", {"auth": creds(request), **query})
        return JSONResponse(result, headers=NO_STORE)

    async def quota(request: Request) -> Response:
        query = only_keys(dict(request.query_params), ("user_id",))
        params: dict[str, Any] = {"auth": creds(request)}
        if "user_id" in query:
            params["userId"] = query["user_id"]
        return JSONResponse(await up.call("gateway", "getUserQuota", params),
                            headers=NO_STORE)

    async def health(request: Request) -> Response:
        body = dict(await up.call("gateway", "getServiceHealth", {}))
        body["web"] = {"peer_id": web.peer_id, "version": __version__, "url": web.url}
        return JSONResponse(body, headers=NO_STORE)

    return [
        Route("/api/auth/register", register, methods=["POST"]),
        Route("/api/auth/login", login, methods=["POST"]),
        Route("/api/auth/refresh", refresh, methods=["POST"]),
        Route("/api/auth/logout", logout, methods=["POST"]),
        Route("/api/auth/me", me, methods=["GET"]),
        Route("/api/auth/password", change_password, methods=["POST"]),
        Route("/api/auth/logout-all", logout_all, methods=["POST"]),
        Route("/api/auth/api-keys", create_key, methods=["POST"]),
        Route("/api/auth/api-keys", list_keys, methods=["GET"]),
        Route("/api/auth/api-keys", revoke_key, methods=["DELETE"]),
        Route("/api/auth/api-keys/{key_id}", revoke_key, methods=["DELETE"]),
        Route("/api/inference", inference, methods=["POST"]),
        Route("/api/models", models, methods=["GET"]),
        Route("/api/usage", usage, methods=["GET"]),
        Route("/api/quota", quota, methods=["GET"]),
        Route("/api/health", health, methods=["GET"]),
    ]
