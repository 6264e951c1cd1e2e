"""The OpenAPI 3.0 document of the web role's HTTP API, served at
``/openapi.json`` and rendered as a page at ``/docs``.

Written out here (the routes take plain JSON, not models), next to the
routes it describes; ``tests/test_web_fuzz.py`` fuzzes the server from
it, which keeps the two honest.
"""

from __future__ import annotations

from typing import Any

from .. import __version__

__all__ = ["openapi_document"]

JSON = "application/json"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
FORM = "application/x-www-form-urlencoded"

KEY_AUTH: list[dict[str, list[str]]] = [{"ApiKey": []}, {"Bearer": []}]
TOKEN_AUTH: list[dict[str, list[str]]] = [{"Bearer": []}]
OLLAMA_AUTH: list[dict[str, list[str]]] = [{"Bearer": []}, {"ApiKey": []}, {"Basic": []}]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: dict[str, Any], required: tuple[str, ...] = (), *,
         extra: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props,
                           "additionalProperties": extra}
    if required:
        out["required"] = list(required)
    return out


def _str(max_len: int = 1000, **kw: Any) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_len, **kw}


def _body(schema: dict[str, Any], media: str = JSON, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {media: {"schema": schema}}}


def _answer(description: str, schema: dict[str, Any] | None = None,
            media: str = JSON, stream: str | None = None) -> dict[str, Any]:
    content = {media: {"schema": schema or {"type": "object"}}}
    if stream is not None:
        content[stream] = {"schema": {"type": "string"}}
    return {"description": description, "content": content}


def _errors(schema: str, *codes: int) -> dict[str, Any]:
    names = {400: "bad request", 401: "no or bad credentials", 403: "not allowed",
             404: "not found", 409: "conflict", 413: "body too large",
             422: "invalid parameters", 429: "rate limited (Retry-After)",
             503: "no node available (Retry-After)"}
    out = {str(c): {"description": names[c], "content": {JSON: {"schema": _ref(schema)}}}
           for c in codes}
    out["default"] = {"description": "error", "content": {JSON: {"schema": _ref(schema)}}}
    return out


def _op(tag: str, summary: str, responses: dict[str, Any], *, body: dict[str, Any] | None = None,
        security: list[dict[str, list[str]]] | None = None,
        parameters: list[dict[str, Any]] | None = None, description: str = "",
        operation_id: str) -> dict[str, Any]:
    op: dict[str, Any] = {"tags": [tag], "summary": summary, "operationId": operation_id,
                          "responses": responses}
    if description:
        op["description"] = description
    if body is not None:
        op["requestBody"] = body
    op["security"] = security or []
    if parameters:
        op["parameters"] = parameters
    return op


MESSAGE = _obj({"role": {"type": "string", "enum": ["system", "user", "assistant"]},
                "content": _str(100_000)}, ("role", "content"))
STOP = {"oneOf": [_str(64, minLength=1),
                  {"type": "array", "items": _str(64, minLength=1), "maxItems": 4}]}
SAMPLING: dict[str, Any] = {
    "model": _str(128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$", example="smollm2"),
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 4096},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1},
    "stop": STOP,
    "seed": {"type": "integer", "minimum": 0, "maximum": 4294967295},
}
OLLAMA_OPTIONS = _obj({"num_predict": {"type": "integer", "minimum": -2, "maximum": 4096},
                       "temperature": SAMPLING["temperature"], "top_p": SAMPLING["top_p"],
                       "stop": {"type": "array", "items": _str(64, minLength=1),
                                "maxItems": 4},
                       "seed": SAMPLING["seed"], "num_ctx": {"type": "integer"},
                       "top_k": {"type": "integer"}})

SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": _obj({"code": {"type": "integer"}, "type": {"type": "string"},
                                  "message": {"type": "string"},
                                  "data": {"type": "object"}}, ("code", "type", "message"),
                                 extra=True)}, ("error",)),
    "OpenAIError": _obj({"error": _obj({"message": {"type": "string"},
                                        "type": {"type": "string"},
                                        "param": {"type": "string", "nullable": True},
                                        "code": {"type": "string", "nullable": True}},
                                       ("message", "type"), extra=True)}, ("error",)),
    "OllamaError": _obj({"error": {"type": "string"}}, ("error",)),
    "Register": _obj({"username": _str(32, minLength=3), "email": _str(100, format="email"),
                      "password": _str(256, minLength=10)}, ("username", "email", "password")),
    "Login": _obj({"username": _str(100), "email": _str(100),
                   "password": _str(256)}, ("password",)),
    "Refresh": _obj({"refresh_token": _str(4096)}, ("refresh_token",)),
    "Logout": _obj({"refresh_token": _str(4096)}),
    "User": _obj({"user_id": {"type": "string"}, "username": {"type": "string"},
                  "email": {"type": "string"}, "tier": {"type": "string"},
                  "is_active": {"type": "boolean"}, "is_admin": {"type": "boolean"}},
                 extra=True),
    "Session": _obj({"token": {"type": "string"}, "token_type": {"type": "string"},
                     "expires_at": {"type": "number"}, "refresh_token": {"type": "string"},
                     "session_id": {"type": "string"}, "user": _ref("User")}, extra=True),
    "NewKey": _obj({"name": _str(100)}),
    "EraseMe": _obj({"password": _str(4096)}, ("password",)),
    "ChangePassword": _obj({"current_password": _str(4096), "new_password": _str(4096)},
                           ("current_password", "new_password")),
    "Erased": _obj({"user_id": {"type": "string"}, "erased_at": {"type": "number"},
                    "revoked_keys": {"type": "integer"}, "redacted": {"type": "integer"},
                    "already_erased": {"type": "boolean"}}, extra=True),
    "IssuedKey": _obj({"api_key": {"type": "string"}, "key_id": {"type": "string"},
                       "public_id": {"type": "string"},
                       "name": {"type": "string", "nullable": True}}, extra=True),
    "KeyList": _obj({"keys": {"type": "array", "items": {"type": "object"}}}, ("keys",)),
    "Inference": _obj({"prompt": _str(100_000, example="Write a poem about AI"),
                       "system": _str(100_000),
                       "messages": {"type": "array", "items": MESSAGE, "minItems": 1,
                                    "maxItems": 64},
                       **SAMPLING, "cache": {"type": "boolean"},
                       "stream": {"type": "boolean"}}),
    "InferenceResult": _obj({"text": {"type": "string"}, "model": {"type": "string"},
                             "finish_reason": {"type": "string", "nullable": True},
                             "usage": {"type": "object"},
                             "request_id": {"type": "string"},
                             "worker": {"type": "string"},
                             "latency_ms": {"type": "number"}}, ("text",), extra=True),
    "ChatCompletionRequest": _obj({
        "messages": {"type": "array", "minItems": 1, "maxItems": 64, "items": _obj({
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
            "content": _str(100_000), "name": _str(64)}, ("role", "content"))},
        **SAMPLING, "max_completion_tokens": SAMPLING["max_tokens"],
        "n": {"type": "integer", "enum": [1]}, "stream": {"type": "boolean"},
        "stream_options": _obj({"include_usage": {"type": "boolean"}}),
        "user": _str(256)}, ("messages",)),
    "CompletionRequest": _obj({"prompt": _str(100_000), **SAMPLING,
                               "n": {"type": "integer", "enum": [1]},
                               "stream": {"type": "boolean"},
                               "stream_options": _obj({"include_usage": {"type": "boolean"}})},
                              ("prompt",)),
    "OllamaChat": _obj({"model": _str(128, minLength=1, example="smollm2"), "messages": {
        "type": "array", "maxItems": 64, "items": MESSAGE}, "stream": {"type": "boolean"},
        "options": OLLAMA_OPTIONS, "keep_alive": {"type": "string"}},
        ("model", "messages")),
    "OllamaGenerate": _obj({"model": _str(128, minLength=1, example="smollm2"),
                            "prompt": _str(100_000, example="Why is the sky blue?"),
                            "system": _str(100_000), "stream": {"type": "boolean"},
                            "options": OLLAMA_OPTIONS,
                            "keep_alive": {"type": "string"}}, ("model",)),
    "OllamaShow": _obj({"model": _str(128, minLength=1, example="smollm2")}, ("model",)),
    "LoginForm": _obj({"login": _str(200), "password": _str(256), "next": _str(200),
                       "csrf_token": _str(100)}, ("login", "password")),
    "RegisterForm": _obj({"username": _str(200), "email": _str(200), "password": _str(256),
                          "csrf_token": _str(100)}, ("username", "email", "password")),
}

DATE = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}


def _paths() -> dict[str, Any]:
    e = _errors
    ok = _answer
    return {
        "/api/auth/register": {"post": _op(
            "auth", "Create an account", {"201": ok("the user", _ref("User")),
                                          **e("Error", 409, 422, 429)},
            body=_body(_ref("Register")), operation_id="register")},
        "/api/auth/login": {"post": _op(
            "auth", "Log in: a session (access and refresh token)",
            {"200": ok("the session", _ref("Session")), **e("Error", 401, 403, 422, 429)},
            body=_body(_ref("Login")), operation_id="login",
            description="Give `username` or `email`. Too many failures answer 429 "
                        "(LoginThrottled) with Retry-After.")},
        "/api/auth/refresh": {"post": _op(
            "auth", "Trade a refresh token for a new pair",
            {"200": ok("the session", _ref("Session")), **e("Error", 401, 422)},
            body=_body(_ref("Refresh")), operation_id="refresh")},
        "/api/auth/logout": {"post": _op(
            "auth", "End the session", {"200": ok("revoked"), **e("Error", 401, 422)},
            body=_body(_ref("Logout"), required=False), security=TOKEN_AUTH,
            operation_id="logout")},
        "/api/auth/logout-all": {"post": _op(
            "auth", "End every session of the caller's account, on every node",
            {"200": ok("when the sessions ended"), **e("Error", 401, 422)},
            security=TOKEN_AUTH, operation_id="logoutEverywhere",
            description="For a lost or shared device: every session token of the account "
                        "(this one too) is refused once the change has replicated. API keys "
                        "stay valid.")},
        "/api/auth/password": {"post": _op(
            "auth", "Change the caller's password: every other session ends",
            {"200": ok("the new session", _ref("Session")), **e("Error", 401, 422, 429)},
            body=_body(_ref("ChangePassword")), security=TOKEN_AUTH,
            operation_id="changePassword",
            description="Needs the session token and the current password (a wrong one "
                        "counts as a failed login). Every session of the account, on "
                        "every node, ends once the change has replicated; the answer is "
                        "a new session. API keys stay valid.")},
        "/api/auth/me": {
            "get": _op("auth", "The caller's account", {"200": ok("the user", _ref("User")),
                                                        **e("Error", 401)},
                       security=KEY_AUTH, operation_id="me"),
            "delete": _op(
                "privacy", "Delete (erase) the caller's account on every node",
                {"200": ok("erased", _ref("Erased")), **e("Error", 401, 422, 429)},
                body=_body(_ref("EraseMe")), security=TOKEN_AUTH, operation_id="eraseMe",
                description="Needs the session token and the password (a wrong password "
                            "counts as a failed login). Username and email are erased "
                            "everywhere; usage totals stay.")},
        "/api/auth/export": {"get": _op(
            "privacy", "Everything the swarm holds about the caller (JSON)",
            {"200": ok("the export"), **e("Error", 401, 403, 404, 422)},
            security=TOKEN_AUTH, operation_id="exportData",
            parameters=[{"name": "user_id", "in": "query", "required": False,
                         "description": "another user's (admins only)",
                         "schema": {"type": "string", "format": "uuid"}}])},
        "/api/auth/users/{user_id}": {"delete": _op(
            "privacy", "Erase a user's account (admins)",
            {"200": ok("erased", _ref("Erased")), **e("Error", 401, 403, 404, 422)},
            security=TOKEN_AUTH, operation_id="eraseUser",
            parameters=[{"name": "user_id", "in": "path", "required": True,
                         "schema": {"type": "string", "format": "uuid"}}])},
        "/api/auth/api-keys": {
            "post": _op("keys", "Create an API key (shown once)",
                        {"201": ok("the key", _ref("IssuedKey")), **e("Error", 401, 422, 429)},
                        body=_body(_ref("NewKey"), required=False), security=TOKEN_AUTH,
                        operation_id="createKey"),
            "get": _op("keys", "List the caller's API keys",
                       {"200": ok("the keys", _ref("KeyList")), **e("Error", 401)},
                       security=KEY_AUTH, operation_id="listKeys"),
        },
        "/api/auth/api-keys/{key_id}": {"delete": _op(
            "keys", "Revoke an API key", {"200": ok("revoked"), **e("Error", 401, 403, 404,
                                                                    422)},
            security=TOKEN_AUTH, operation_id="revokeKey",
            parameters=[{"name": "key_id", "in": "path", "required": True,
                         "schema": {"type": "string", "format": "uuid"}}])},
        "/api/inference": {"post": _op(
            "inference", "Run a prompt",
            {"200": ok("the answer; NDJSON lines with stream: true", _ref("InferenceResult"),
                       stream=NDJSON),
             **e("Error", 401, 404, 413, 422, 429, 503)},
            body=_body(_ref("Inference")), security=KEY_AUTH, operation_id="inference",
            description="`prompt` or `messages`. With `\"stream\": true` the answer is "
                        "NDJSON: `{\"delta\"}` lines, then `{\"done\": true, \"model\", "
                        "\"finish_reason\", \"usage\", \"request_id\", ...}`; an error after "
                        "the first line comes as `{\"error\": {...}}`.")},
        "/api/models": {"get": _op("inference", "Models served in the swarm",
                                   {"200": ok("the models"), **e("Error", 401)},
                                   security=KEY_AUTH, operation_id="models")},
        "/api/usage": {"get": _op(
            "usage", "Usage per day and API key", {"200": ok("rows"), **e("Error", 401, 422)},
            security=KEY_AUTH, operation_id="usage",
            parameters=[{"name": n, "in": "query", "required": False, "schema": DATE}
                        for n in ("since", "until")])},
        "/api/quota": {"get": _op("usage", "Usage in the current window and the limits",
                                  {"200": ok("quota"), **e("Error", 401, 403)},
                                  security=KEY_AUTH, operation_id="quota")},
        "/api/health": {"get": _op("system", "The gateway's view of the swarm",
                                   {"200": ok("health"), **e("Error", 503)},
                                   operation_id="health")},
        "/v1/models": {"get": _op("openai", "OpenAI: list models",
                                  {"200": ok("model list"), **e("OpenAIError", 401)},
                                  security=TOKEN_AUTH, operation_id="openaiModels")},
        "/v1/chat/completions": {"post": _op(
            "openai", "OpenAI: chat completion (SSE with stream: true)",
            {"200": ok("a chat.completion", stream=SSE),
             **e("OpenAIError", 400, 401, 404, 429)},
            body=_body(_ref("ChatCompletionRequest")), security=TOKEN_AUTH,
            operation_id="openaiChat")},
        "/v1/completions": {"post": _op(
            "openai", "OpenAI: text completion", {"200": ok("a text_completion",
                                                            stream=SSE),
                                                 **e("OpenAIError", 400, 401, 404, 429)},
            body=_body(_ref("CompletionRequest")), security=TOKEN_AUTH,
            operation_id="openaiCompletion")},
        "/api/chat": {"post": _op(
            "ollama", "Ollama: chat (NDJSON unless stream: false)",
            {"200": ok("the answer", stream=NDJSON),
             **e("OllamaError", 400, 401, 404, 429)},
            body=_body(_ref("OllamaChat")), security=OLLAMA_AUTH, operation_id="ollamaChat")},
        "/api/generate": {"post": _op(
            "ollama", "Ollama: generate", {"200": ok("the answer",
                                                     stream=NDJSON),
                                           **e("OllamaError", 400, 401, 404, 429)},
            body=_body(_ref("OllamaGenerate")), security=OLLAMA_AUTH,
            operation_id="ollamaGenerate")},
        "/api/tags": {"get": _op("ollama", "Ollama: models", {"200": ok("models"),
                                                             **e("OllamaError", 401)},
                                 security=OLLAMA_AUTH, operation_id="ollamaTags")},
        "/api/show": {"post": _op("ollama", "Ollama: one model's details",
                                  {"200": ok("details"), **e("OllamaError", 401, 404)},
                                  body=_body(_ref("OllamaShow")), security=OLLAMA_AUTH,
                                  operation_id="ollamaShow")},
        "/api/ps": {"get": _op("ollama", "Ollama: loaded models", {"200": ok("models"),
                                                                  **e("OllamaError", 401)},
                               security=OLLAMA_AUTH, operation_id="ollamaPs")},
        "/api/version": {"get": _op("ollama", "Ollama: version", {"200": ok("version")},
                                    operation_id="ollamaVersion")},
        "/register": {"post": _op(
            "pages", "Form: create an account (needs the page's CSRF token)",
            {"303": {"description": "to /login"}, "200": ok("the form with an error",
                                                            media="text/html")},
            body=_body(_ref("RegisterForm"), FORM), operation_id="registerForm")},
        "/login": {"post": _op(
            "pages", "Form: log in (needs the page's CSRF token)",
            {"303": {"description": "to the dashboard"},
             "200": ok("the form with an error", media="text/html")},
            body=_body(_ref("LoginForm"), FORM), operation_id="loginForm")},
    }


def openapi_document(server_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI document (``server_url``: where this node serves it)."""
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "p2pinfer web API", "version": __version__,
                 "description": "The REST API of a p2pinfer web node, its OpenAI- and "
                                "Ollama-compatible endpoints, and the page forms. Errors: "
                                "`{\"error\": {\"code\", \"type\", \"message\", \"data\"}}` "
                                "(REST), OpenAI's and Ollama's own shapes on their routes."},
        "paths": _paths(),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "Bearer": {"type": "http", "scheme": "bearer",
                           "description": "an API key (p2p_...) or a session token"},
                "Basic": {"type": "http", "scheme": "basic",
                          "description": "the API key as the password"},
            },
        },
        "tags": [{"name": n} for n in ("auth", "keys", "privacy", "inference", "usage",
                                       "system", "openai", "ollama", "pages")],
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc
