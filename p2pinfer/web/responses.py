"""Errors as HTTP responses, in each dialect the web role speaks.

- REST (``/api/...``): ``{"error": err.to_dict()}`` (``code``, ``type``,
  ``message``, ``data``) with the error's ``http_status``; the SDK rebuilds
  the same error class from ``code``.
- OpenAI (``/v1/...``): ``{"error": {"message", "type", "param", "code"}}``.
- Ollama (``/api/chat``, ``/api/generate``, ...): ``{"error": "message"}``.

Every limit error carries ``Retry-After`` (whole seconds, rounded up).
Anything that is not a :class:`~p2pinfer.errors.P2PInferError` is turned
into one at this boundary by :func:`as_error`.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import trio
from starlette.responses import JSONResponse

from ..errors import (
    AccessError,
    AuthenticationRequired,
    Cancelled,
    DeadlineExceeded,
    HandlerError,
    InvalidParams,
    LimitError,
    P2PInferError,
    PeerUnavailable,
    UnknownModel,
    ValidationError,
)

__all__ = ["as_error", "error_headers", "http_status", "json_error", "ollama_error",
           "openai_error", "openai_error_body", "dumps"]

log = logging.getLogger(__name__)


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes (what every streamed line uses)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def as_error(exc: BaseException) -> P2PInferError:
    """Our error for ``exc`` (the boundary rule: nothing else leaves as HTTP)."""
    if isinstance(exc, P2PInferError):
        return exc
    if isinstance(exc, TimeoutError | trio.TooSlowError):
        return DeadlineExceeded("the request took too long")
    log.error("unexpected error in the web role", exc_info=exc)
    return HandlerError(f"internal error ({type(exc).__name__})")


def http_status(err: P2PInferError) -> int:
    """The HTTP status for ``err`` (499, a client-closed-request, is not one
    we can send: a cancelled upstream call means the service is unavailable)."""
    if isinstance(err, Cancelled):
        return 503
    status = err.http_status
    return status if 400 <= status <= 599 else 500


def error_headers(err: P2PInferError) -> dict[str, str]:
    headers: dict[str, str] = {"Cache-Control": "no-store"}
    wait = err.retry_after
    if wait is None and http_status(err) in (429, 503):
        wait = 1.0
    if wait is not None:
        headers["Retry-After"] = str(max(1, math.ceil(wait)))
    if http_status(err) == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="p2pinfer"'
    return headers


def json_error(err: P2PInferError) -> JSONResponse:
    """The REST form: ``{"error": err.to_dict()}``."""
    return JSONResponse({"error": err.to_dict()}, status_code=http_status(err),
                        headers=error_headers(err))


def _openai_type(err: P2PInferError, status: int) -> str:
    if isinstance(err, LimitError) and status == 429:
        return "rate_limit_error"
    if status == 401 or isinstance(err, AuthenticationRequired):
        return "authentication_error"
    if isinstance(err, AccessError):
        return "permission_error"
    if status >= 500:
        return "api_error"
    return "invalid_request_error"


def _openai_status(err: P2PInferError) -> int:
    # OpenAI answers a request it cannot accept with 400, not 422.
    if isinstance(err, InvalidParams | ValidationError):
        return 400
    return http_status(err)


def openai_error_body(err: P2PInferError) -> dict[str, Any]:
    status = _openai_status(err)
    field = err.data.get("field")
    return {"error": {"message": err.message, "type": _openai_type(err, status),
                      "param": field if isinstance(field, str) else None,
                      "code": _openai_code(err)}}


def _openai_code(err: P2PInferError) -> str:
    name = type(err).__name__
    out = [("_" + c.lower()) if c.isupper() else c for c in name]
    return "".join(out).lstrip("_")


def openai_error(err: P2PInferError) -> JSONResponse:
    """The OpenAI form: ``{"error": {"message", "type", "param", "code"}}``."""
    return JSONResponse(openai_error_body(err), status_code=_openai_status(err),
                        headers=error_headers(err))


def ollama_error(err: P2PInferError) -> JSONResponse:
    """The Ollama form: ``{"error": "message"}``. A model no worker serves is
    404 (what Ollama answers for a model it has not pulled); a request it
    cannot take is 400, as Ollama answers (p2pinfer's REST API says 422)."""
    status = http_status(err)
    if isinstance(err, PeerUnavailable) and status != 503:
        status = 503
    if status == 422:
        status = 400
    message = err.message
    if isinstance(err, UnknownModel) and isinstance(err.data.get("model"), str):
        message = f'model "{err.data["model"]}" not found'  # Ollama's own words
    return JSONResponse({"error": message}, status_code=status, headers=error_headers(err))
