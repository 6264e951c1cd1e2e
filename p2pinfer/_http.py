"""The SDK's HTTP transport: the web role's REST API, spoken with httpx.

Errors come back as ``{"error": {"code", "type", "message", "data"}}`` with
the matching HTTP status; the code rebuilds the same error class the
peer-to-peer path raises. ``POST /api/inference`` with ``"stream": true``
answers NDJSON: ``{"delta": "..."}`` lines, then one ``{"done": true, ...}``
line carrying the trailer (model, finish_reason, usage, request_id, ...).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx

from .errors import (
    MalformedBackendResponse,
    P2PInferError,
    PeerUnavailable,
    error_from_code,
)

__all__ = ["HttpStream", "error_from_response", "get_json", "request_json"]


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


async def get_json(http: httpx.AsyncClient, path: str, headers: dict[str, str],
                   params: dict[str, str] | None = None) -> Any:
    """``GET path`` as JSON (see :func:`request_json`)."""
    return await request_json(http, "GET", path, headers=headers, params=params)


class HttpStream:
    """One streamed ``POST /api/inference``."""

    def __init__(self, resp: httpx.Response) -> None:
        self._resp = resp
        self._lines: AsyncIterator[str] = resp.aiter_lines()
        self.trailer: dict[str, Any] | None = None
        self.logprobs: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, http: httpx.AsyncClient, request: dict[str, Any],
                   headers: dict[str, str]) -> HttpStream:
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

    async def next_event(self) -> str | None:
        """The next text delta, or None once the answer is complete."""
        async for line in self._lines:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError as exc:
                raise MalformedBackendResponse(f"not NDJSON: {line[:100]!r}") from exc
            if "error" in event:
                err = event["error"]
                raise error_from_code(int(err.get("code", 1)), str(err.get("message", "")),
                                      err.get("data"))
            if event.get("done"):
                self.trailer = event
                return None
            if isinstance(event.get("logprobs"), list):
                self.logprobs.extend(event["logprobs"])
            return str(event.get("delta", ""))
        raise MalformedBackendResponse("the stream ended before its final line")

    def response(self, parts: list[str]) -> Any:
        """The whole answer, once :meth:`next_event` returned None."""
        from .client import InferenceResponse

        return InferenceResponse.from_trailer("".join(parts), self.trailer,
                                              logprobs=self.logprobs)

    async def aclose(self) -> None:
        """Close the HTTP response (cancels the request if it is still running)."""
        await self._resp.aclose()
