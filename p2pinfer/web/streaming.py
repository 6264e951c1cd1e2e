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

import anyio
from starlette.responses import Response

from ..errors import P2PInferError
from .responses import as_error
from .upstream import InferenceCall

__all__ = ["Dialect", "MultiDialect", "MultiStreamResponse", "StreamResponse"]

log = logging.getLogger(__name__)


class Dialect(Protocol):
    """How one HTTP dialect writes a streamed answer (bytes per event)."""

    media_type: str

    def start(self) -> bytes: ...

    def delta(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> bytes: ...

    def done(self, trailer: dict[str, Any]) -> bytes: ...

    def error(self, err: P2PInferError) -> bytes: ...


async def _watch_disconnect(receive: Any, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` when the HTTP client goes away."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


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
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_watch_disconnect, receive, tasks.cancel_scope)
                await self._write(send)
                tasks.cancel_scope.cancel()
        except Exception as exc:
            # the status line is out: nothing else can be said to this client
            # (most often it went away while we were writing)
            log.debug("streaming to the client stopped: %r", exc)
        finally:
            await self.call.aclose()


    async def _write(self, send: Any) -> None:
        async def body(data: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        try:
            opening = self.dialect.start()
            if opening:
                await body(opening)
            async for text in self.call:
                if text or self.call.chunk_logprobs:
                    await body(self.dialect.delta(text, self.call.chunk_logprobs))
        except (anyio.get_cancelled_exc_class(), OSError):
            raise
        except Exception as exc:
            err = as_error(exc)
            self.outcome = "error"
            log.info("inference stream failed after the status line: %s", err.message)
            await body(self.dialect.error(err), more=False)
            return
        self.outcome = "success"
        await body(self.dialect.done(self.call.trailer), more=False)


class MultiDialect(Protocol):
    """How a dialect writes several answers streamed as one (OpenAI's ``n``)."""

    media_type: str

    def start_many(self, n: int) -> bytes: ...

    def delta_at(self, index: int, text: str,
                 logprobs: list[dict[str, Any]] | None = None) -> bytes: ...

    def done_many(self, trailers: list[dict[str, Any]]) -> bytes: ...

    def error(self, err: P2PInferError) -> bytes: ...


class MultiStreamResponse(Response):
    """Streams several calls at once through ``dialect``, their pieces in the
    order they arrive, each marked with its call's index; ends once all
    have. A call that fails ends the whole stream with its error (and the
    others are cancelled); a client that goes away cancels them all."""

    def __init__(self, calls: list[InferenceCall], dialect: MultiDialect) -> None:
        super().__init__(content=None, status_code=200, media_type=dialect.media_type,
                         headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.calls = calls
        self.dialect = dialect

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def body(data: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_watch_disconnect, receive, tasks.cancel_scope)
                await self._write(body)
                tasks.cancel_scope.cancel()
        except Exception as exc:
            log.debug("streaming to the client stopped: %r", exc)
        finally:
            with anyio.CancelScope(shield=True):
                for call in self.calls:
                    await call.aclose()

    async def _write(self, body: Any) -> None:
        send, recv = anyio.create_memory_object_stream[tuple[int, str, Any]](
            len(self.calls) * 4)

        async def read(index: int, call: InferenceCall) -> None:
            async for text in call:
                if text or call.chunk_logprobs:
                    await send.send((index, text, call.chunk_logprobs))

        failed: list[Exception] = []

        async def read_all() -> None:
            try:
                async with anyio.create_task_group() as readers:
                    for index, call in enumerate(self.calls):
                        readers.start_soon(read, index, call)
            except Exception as exc:  # the first call's error ends them all
                failed.append(exc)
            finally:
                send.close()

        await body(self.dialect.start_many(len(self.calls)))
        async with anyio.create_task_group() as tasks, recv:
            tasks.start_soon(read_all)
            async for index, text, scores in recv:
                await body(self.dialect.delta_at(index, text, scores))
        if failed:
            err: BaseException = failed[0]
            while isinstance(err, BaseExceptionGroup):
                err = err.exceptions[0]
            await body(self.dialect.error(as_error(err)), more=False)
            return
        await body(self.dialect.done_many([call.trailer for call in self.calls]), more=False)
