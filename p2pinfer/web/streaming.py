"""Streaming an inference answer over HTTP, in any of the three dialects.

:class:`StreamResponse` is an ASGI response that writes what a
:class:`Dialect` makes of each event of an
:class:`~p2pinfer.web.upstream.InferenceCall`: its opening, each text
delta, the end (with the gateway's trailer) or an error after the status
line was sent. It watches for the client going away and then cancels the
call, which cancels the request on the gateway and the worker.

Dialects: NDJSON for the REST API (:mod:`~p2pinfer.web.api`), server-sent
events for OpenAI (:mod:`~p2pinfer.web.openai_api`), NDJSON for Ollama
(:mod:`~p2pinfer.web.ollama_api`).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import trio
from starlette.responses import Response

from ..errors import P2PInferError
from .responses import as_error
from .upstream import InferenceCall

__all__ = ["Dialect", "StreamResponse"]

log = logging.getLogger(__name__)


class Dialect(Protocol):
    """How one HTTP dialect writes a streamed answer (bytes per event)."""

    media_type: str

    def start(self) -> bytes: ...

    def delta(self, text: str) -> bytes: ...

    def done(self, trailer: dict[str, Any]) -> bytes: ...

    def error(self, err: P2PInferError) -> bytes: ...


class StreamResponse(Response):
    """Streams ``call`` through ``dialect`` (see the module docstring)."""

    def __init__(self, call: InferenceCall, dialect: Dialect, *,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(content=None, status_code=200, media_type=dialect.media_type,
                         headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no",
                                  **(headers or {})})
        # the length is unknown: the body is chunked
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.call = call
        self.dialect = dialect
        self.outcome = "cancelled"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_disconnect, receive, nursery.cancel_scope)
                await self._write(send)
                nursery.cancel_scope.cancel()
        except Exception as exc:
            # the status line is out: nothing else can be said to this client
            # (most often it went away while we were writing)
            log.debug("streaming to the client stopped: %r", exc)
        finally:
            await self.call.aclose()

    async def _watch_disconnect(self, receive: Any, scope: trio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                scope.cancel()
                return

    async def _write(self, send: Any) -> None:
        async def body(data: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        try:
            opening = self.dialect.start()
            if opening:
                await body(opening)
            async for text in self.call:
                if text:
                    await body(self.dialect.delta(text))
        except (trio.Cancelled, OSError):
            raise
        except Exception as exc:
            err = as_error(exc)
            self.outcome = "error"
            log.info("inference stream failed after the status line: %s", err.message)
            await body(self.dialect.error(err), more=False)
            return
        self.outcome = "success"
        await body(self.dialect.done(self.call.trailer), more=False)
