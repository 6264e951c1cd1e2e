"""Reading what an HTTP request carries: JSON bodies, form fields, the
client's address (pure helpers over Starlette requests)."""

from __future__ import annotations

import contextvars
import json
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request

from ..errors import InvalidParams
from ..rpc.server import throttle_address

__all__ = ["current_source", "only_keys", "read_form", "read_json", "source_of"]


async def read_json(request: Request, *, empty_ok: bool = False) -> dict[str, Any]:
    """The body as a JSON object (whatever the Content-Type claims).

    Raises:
        InvalidParams: not JSON, or not an object (``data.field="body"``).
    """
    raw = await request.body()
    if not raw.strip():
        if empty_ok:
            return {}
        raise InvalidParams("body: a JSON object is required", data={"field": "body"})
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidParams("body: not valid JSON", data={"field": "body"}) from None
    if not isinstance(value, dict):
        raise InvalidParams("body: must be a JSON object", data={"field": "body"})
    return value


def only_keys(body: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    """``body`` if every key is in ``allowed``, else InvalidParams naming the first other."""
    for key in body:
        if key not in allowed:
            raise InvalidParams(f"{str(key)[:64]}: unknown field", data={"field": str(key)[:64]})
    return body


async def read_form(request: Request) -> dict[str, str]:
    """The fields of a url-encoded form (what the pages' forms send); the
    first value of a repeated field wins.

    Raises:
        InvalidParams: another content type, or not a form.
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise InvalidParams("body: must be a url-encoded form", data={"field": "body"})
    raw = await request.body()
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=50,
                          strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise InvalidParams("body: not a form", data={"field": "body"}) from None
    out: dict[str, str] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


#: ``ip:<address>`` of the HTTP client being served (set per request by
#: :class:`~p2pinfer.web.app.ClientSource`): API key guesses are throttled
#: per client, here and at the gateway, not per web node.
current_source: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "p2pinfer_web_source", default=None)


def source_of(request: Request) -> str:
    """The client's address as the auth role records it (``ip:<address>``)."""
    client = request.client
    return f"ip:{throttle_address(client.host)}" if client is not None else "ip:unknown"
