"""The blocking SDK: :class:`SyncClient` and :class:`SyncStream`.

:class:`SyncClient` wraps :class:`~p2pinfer.client.Client` for plain scripts
and for asyncio programs: it runs trio in a background thread of its own and
hands each call over with ``trio.from_thread``. Both names can be imported
from :mod:`p2pinfer.client` too (lazily: this module imports that one) and
:class:`SyncClient` from :mod:`p2pinfer`.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import trio

from .client import Client, EmbeddingResponse, InferenceResponse
from .errors import InvalidParams, NoWorkerAvailable, StreamBroken
from .transports import sole_error

__all__ = ["SyncClient", "SyncStream"]

T = TypeVar("T")

class SyncStream:
    """A streamed answer for synchronous code: iterate to get the text deltas
    as they arrive; :attr:`response` is set once the answer is complete.
    :meth:`close` (or leaving ``with``) cancels the request."""

    def __init__(self, owner: SyncClient, prompt: str | None, kwargs: dict[str, Any]) -> None:
        self._owner = owner
        self._prompt = prompt
        self._kwargs = kwargs
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._scope: trio.CancelScope | None = None
        self._done = False
        self.response: InferenceResponse | None = None

    def _start(self) -> None:
        if self._scope is None and not self._done:
            self._scope = self._owner._spawn(self._pump)

    async def _pump(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        client = self._owner._require()
        with trio.CancelScope() as scope:
            task_status.started(scope)
            try:
                async with client.stream(self._prompt, **self._kwargs) as stream:
                    async for delta in stream:
                        self._queue.put(("delta", delta))
                self._queue.put(("done", stream.response))
            except trio.Cancelled:
                self._queue.put(("error", StreamBroken("the request was cancelled")))
                raise
            except Exception as exc:
                self._queue.put(("error", exc))

    def __iter__(self) -> Iterator[str]:
        self._start()
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        self._start()
        kind, value = self._queue.get()
        if kind == "delta":
            return str(value)
        self._done = True
        if kind == "done":
            self.response = value
            raise StopIteration
        raise value

    def text(self) -> str:
        """Consume the rest and return the whole answer."""
        return "".join(list(self))

    def close(self) -> None:
        """Cancel the request if it is still running."""
        if self._scope is not None and not self._done:
            self._done = True
            self._owner._cancel(self._scope)

    def __enter__(self) -> SyncStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncClient:
    """A blocking :class:`Client` for plain scripts and asyncio programs.

    It runs trio in a background thread of its own, so it works whether or
    not the calling thread already runs an event loop (asyncio's included)::

        with SyncClient(bootstrap=[...], api_key="p2p_...") as client:
            print(client.inference(prompt="Hello").text)
            for text in client.stream("Tell me a story"):
                print(text, end="", flush=True)

    Takes the same keyword arguments as :class:`Client`. Inside an asyncio
    program each call blocks the calling thread; run it with
    ``await asyncio.to_thread(client.inference, ...)`` to keep the loop free.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None
        self._client: Client | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> SyncClient:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client(self) -> Client:
        """The :class:`Client` running in the background thread."""
        return self._require()

    def open(self) -> None:
        """Start the background thread and open the client (idempotent).

        Raises:
            P2PInferError: the client could not start (e.g. a bad argument).
        """
        with self._lock:
            if self._thread is not None:
                return
            client = Client(**self._kwargs)  # argument errors surface here, in the caller
            self._ready.clear()

            async def main() -> None:
                self._token = trio.lowlevel.current_trio_token()
                self._stop = trio.Event()
                try:
                    async with client, trio.open_nursery() as nursery:
                        self._client = client
                        self._nursery = nursery
                        self._ready.set()
                        await self._stop.wait()
                        nursery.cancel_scope.cancel()
                except BaseException as exc:  # report start-up failures to open()
                    self._error = exc
                finally:
                    self._client = None
                    self._nursery = None
                    self._ready.set()

            thread = threading.Thread(target=trio.run, args=(main,), daemon=True,
                                      name="p2pinfer-sync-client")
            thread.start()
            self._ready.wait()
            if self._client is None:
                error, self._error = self._error, None
                thread.join()
                if isinstance(error, BaseExceptionGroup):
                    error = sole_error(error) or error
                raise error or RuntimeError("the client stopped during start-up")
            self._thread = thread

    def close(self) -> None:
        """Close the client and stop the background thread."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            stop = self._stop
            if stop is not None and self._token is not None:
                try:
                    trio.from_thread.run_sync(stop.set, trio_token=self._token)
                except trio.RunFinishedError:
                    pass
            thread.join(timeout=10)

    def _require(self) -> Client:
        if self._client is None:
            self.open()
        assert self._client is not None
        return self._client

    def _run(self, fn: Callable[[], Awaitable[T]]) -> T:
        self._require()
        return trio.from_thread.run(fn, trio_token=self._token)

    def _spawn(self, fn: Callable[..., Awaitable[Any]]) -> trio.CancelScope:
        self._require()

        async def start() -> trio.CancelScope:
            assert self._nursery is not None
            scope: trio.CancelScope = await self._nursery.start(fn)
            return scope

        return trio.from_thread.run(start, trio_token=self._token)

    def _cancel(self, scope: trio.CancelScope) -> None:
        try:
            trio.from_thread.run_sync(scope.cancel, trio_token=self._token)
        except trio.RunFinishedError:
            pass

    # -- the API (see Client for each method) ---------------------------------------------
    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(client, *args)`` in the client's trio thread and
        return its result: the escape hatch for anything :class:`Client` can
        do that has no blocking twin here."""
        return self._run(functools.partial(fn, self._require(), *args))

    def inference(self, prompt: str | None = None, **kwargs: Any) -> InferenceResponse:
        """See :meth:`Client.inference`."""
        return self._run(functools.partial(self._require().inference, prompt, **kwargs))

    def stream(self, prompt: str | None = None, **kwargs: Any) -> SyncStream:
        """The answer's text deltas, as they arrive (a :class:`SyncStream`)."""
        return SyncStream(self, prompt, kwargs)

    def embed(self, input: str | list[str], **kwargs: Any) -> EmbeddingResponse:
        """See :meth:`Client.embed`."""
        return self._run(functools.partial(self._require().embed, input, **kwargs))

    def models(self) -> list[dict[str, Any]]:
        """See :meth:`Client.models`."""
        return self._run(self._require().models)

    def wait_for_model(self, name: str | None = None, *, workers: int = 1,
                       timeout: float = 60.0) -> dict[str, Any]:
        """See :meth:`Client.wait_for_model`; gives up after ``timeout`` seconds.

        Raises:
            NoWorkerAvailable: not served within ``timeout``.
            InvalidParams: bad ``workers`` or ``timeout``.
        """
        if not timeout > 0:
            raise InvalidParams("timeout: must be > 0 seconds", data={"field": "timeout"})
        client = self._require()

        async def bounded() -> dict[str, Any]:
            with trio.move_on_after(timeout):
                return await client.wait_for_model(name, workers=workers)
            wanted = "any model" if name is None else f"model {name!r}"
            raise NoWorkerAvailable(f"{workers} worker(s) did not serve {wanted} "
                                    f"within {timeout:g} s", data={"model": name})

        return self._run(bounded)

    def quota(self) -> dict[str, Any]:
        """See :meth:`Client.quota`."""
        return self._run(self._require().quota)

    def usage(self, *, since: str | None = None, until: str | None = None
              ) -> list[dict[str, Any]]:
        """See :meth:`Client.usage`."""
        return self._run(functools.partial(self._require().usage, since=since, until=until))

    def health(self) -> dict[str, Any]:
        """See :meth:`Client.health`."""
        return self._run(self._require().health)

    def system_health(self) -> dict[str, Any]:
        """See :meth:`Client.system_health`."""
        return self._run(self._require().system_health)

    def peers(self) -> list[dict[str, Any]]:
        """See :meth:`Client.peers`."""
        return self._run(self._require().peers)

    def register(self, username: str, email: str, password: str) -> dict[str, Any]:
        """See :meth:`Client.register`."""
        return self._run(functools.partial(self._require().register, username, email, password))

    def login(self, username: str | None = None, *, password: str,
              email: str | None = None) -> dict[str, Any]:
        """See :meth:`Client.login`."""
        return self._run(functools.partial(self._require().login, username, password=password,
                                           email=email))

    def refresh(self, refresh_token: str) -> dict[str, Any]:
        """See :meth:`Client.refresh`."""
        return self._run(functools.partial(self._require().refresh, refresh_token))

    def logout(self, *, refresh_token: str | None = None) -> dict[str, Any]:
        """See :meth:`Client.logout`."""
        return self._run(functools.partial(self._require().logout, refresh_token=refresh_token))

    def logout_everywhere(self) -> dict[str, Any]:
        """See :meth:`Client.logout_everywhere`."""
        return self._run(self._require().logout_everywhere)

    def change_password(self, current_password: str, new_password: str) -> dict[str, Any]:
        """See :meth:`Client.change_password`."""
        return self._run(functools.partial(self._require().change_password, current_password,
                                           new_password))

    def me(self) -> dict[str, Any]:
        """See :meth:`Client.me`."""
        return self._run(self._require().me)

    def create_api_key(self, name: str | None = None) -> dict[str, Any]:
        """See :meth:`Client.create_api_key`."""
        return self._run(functools.partial(self._require().create_api_key, name))

    def api_keys(self) -> list[dict[str, Any]]:
        """See :meth:`Client.api_keys`."""
        return self._run(self._require().api_keys)

    def revoke_api_key(self, key_id: str) -> dict[str, Any]:
        """See :meth:`Client.revoke_api_key`."""
        return self._run(functools.partial(self._require().revoke_api_key, key_id))
