"""What the HTTP backends (OpenAI-compatible, Ollama) share.

- :class:`HttpBackend`: owns its httpx2 clients (:class:`ClientLanes`) for
  the life of :meth:`~HttpBackend.run`, probes the server's catalog now and
  then to keep the model's state honest, and opens streaming requests whose
  failures come out as our own errors. The transport is injectable, so tests
  can put an :class:`httpx2.MockTransport` where the network would be.
- :func:`translate_http_error` and :func:`error_for_status`: httpx2 errors and
  HTTP statuses into the :mod:`p2pinfer.errors` tree (the boundary rule:
  ``raise OurError(...) from exc``).
- :class:`SSEDecoder` (server-sent events) and :func:`parse_json_line` (NDJSON),
  sans-IO: lines in, payloads out.

Error mapping, for every HTTP backend:

    connection refused, reset, DNS failure  -> BackendUnavailable
    any timeout (connect, read, pool)       -> BackendTimeout
    HTTP 404 on the generation endpoint     -> UnknownModel (the server lacks it)
    HTTP 408 / 504                          -> BackendTimeout
    HTTP 429                                -> Overloaded (retry_after from Retry-After)
    HTTP 503                                -> BackendUnavailable
    any other HTTP >= 400                   -> BackendError (data: status)
    unparsable or truncated stream          -> MalformedBackendResponse
"""

from __future__ import annotations

import base64
import collections
import functools
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpcore2
import httpx2
import trio

from ..errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    InferenceError,
    MalformedBackendResponse,
    Overloaded,
    P2PInferError,
    UnknownModel,
)
from .backend import Backend, ModelState

__all__ = [
    "ClientLanes",
    "HttpBackend",
    "SSEDecoder",
    "coalesce_writes",
    "error_for_status",
    "parse_json_line",
    "translate_http_error",
]

log = logging.getLogger(__name__)

MAX_LINE = 1024 * 1024  # one SSE or NDJSON line; a larger one is not a token stream
# Seconds to read what follows an answer's end marker before giving up on
# keeping its connection.
DRAIN_TIMEOUT = 1.0
MAX_ERROR_BODY = 4096
# Bytes a connection holds back before sending without waiting for its read
# (see _CoalescingStream).
COALESCE_LIMIT = 64 * 1024
# Seconds a lane (and so its connection to the server) is kept unused: the
# keep-alive expiry httpx2's pool has by default.
KEEPALIVE_EXPIRY = 5.0
# A lane's pool: one connection, kept between requests.
ONE_CONNECTION = httpx2.Limits(max_connections=1, max_keepalive_connections=1,
                               keepalive_expiry=KEEPALIVE_EXPIRY)


def translate_http_error(exc: httpx2.HTTPError, what: str) -> InferenceError:
    """Our error for an httpx2 failure while doing ``what``."""
    if isinstance(exc, httpx2.TimeoutException):
        return BackendTimeout(f"{what}: timed out ({type(exc).__name__})")
    if isinstance(exc, httpx2.TransportError):
        return BackendUnavailable(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, httpx2.DecodingError):
        return MalformedBackendResponse(f"{what}: undecodable body: {exc}")
    return BackendError(f"{what}: {type(exc).__name__}: {exc}")


def _retry_after(response: httpx2.Response, default: float) -> float:
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        return default
    return min(max(seconds, 0.0), 3600.0)


def _error_message(body: bytes) -> str:
    """The ``error`` text of an OpenAI- or Ollama-style error body, else the body."""
    text = body[:MAX_ERROR_BODY].decode("utf-8", errors="replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return text[:300]
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])[:300]
        if isinstance(err, str):
            return err[:300]
    return text[:300]


def error_for_status(response: httpx2.Response, body: bytes, what: str,
                     *, model: str) -> P2PInferError:
    """Our error for a non-2xx answer (``body`` is its first bytes)."""
    status = response.status_code
    message = f"{what}: HTTP {status}: {_error_message(body)}"
    data: dict[str, Any] = {"status": status}
    if status == 404:
        return UnknownModel(message, data={**data, "model": model})
    if status in (408, 504):
        return BackendTimeout(message, data=data)
    if status == 429:
        return Overloaded(message, data={**data, "retry_after": _retry_after(response, 1.0)})
    if status == 503:
        return BackendUnavailable(message,
                                  data={**data, "retry_after": _retry_after(response, 1.0)})
    return BackendError(message, data=data)


def parse_json_line(line: str, what: str) -> dict[str, Any]:
    """One JSON object from an NDJSON or SSE line, or MalformedBackendResponse."""
    if len(line) > MAX_LINE:
        raise MalformedBackendResponse(f"{what}: a stream line of {len(line)} bytes")
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise MalformedBackendResponse(f"{what}: not JSON: {line[:80]!r}") from exc
    if not isinstance(obj, dict):
        raise MalformedBackendResponse(f"{what}: expected a JSON object, got {line[:80]!r}")
    return obj


class SSEDecoder:
    """Sans-IO server-sent events: feed it lines (without their newline),
    get back the ``data`` payload of each completed event."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed_line(self, line: str) -> list[str]:
        if len(line) > MAX_LINE:
            raise MalformedBackendResponse(f"an SSE line of {len(line)} bytes")
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return []  # a comment (keep-alive)
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        return []  # event:, id:, retry: carry nothing we use

    def close(self) -> list[str]:
        """The last event, if the stream ended without its blank line."""
        return self._dispatch()

    def _dispatch(self) -> list[str]:
        if not self._data:
            return []
        data, self._data = "\n".join(self._data), []
        return [data]


class _Lane:
    """One httpx2 client that holds at most one connection, lent to one
    request at a time; the URL of each request path and the transport the
    client picks for it (its pool, or a proxy the environment names) are
    found once."""

    __slots__ = ("client", "idle_since", "targets")

    def __init__(self, client: httpx2.AsyncClient) -> None:
        self.client = client
        self.targets: dict[str, tuple[httpx2.URL, httpx2.AsyncBaseTransport]] = {}
        self.idle_since = 0.0

    def target(self, base_url: str, path: str) -> tuple[httpx2.URL, httpx2.AsyncBaseTransport]:
        hit = self.targets.get(path)
        if hit is None:
            url = httpx2.URL(base_url + "/" + path.lstrip("/"))
            hit = self.targets[path] = (url, self.client._transport_for_url(url))
        return hit


class ClientLanes:
    """httpx2 clients of one connection each, lent one request at a time.

    One client for every request keeps one pool, which looks over each of
    its connections when a request is assigned and again when a response is
    closed: with 64 answers in flight to one server, that was a quarter of
    what httpx2 costs the worker per answer
    (benchmarks/compare_backend_clients.py). A lane's pool has one
    connection, so that look is one check. A request takes the lane used
    last (its connection is the warmest), or a new one when every lane is
    lent (the engine's slots bound how many are); :meth:`sweep` closes the
    lanes left unused for ``expiry`` seconds with their connections, as a
    pool closes connections idle that long.

    Args:
        make: a new client (same base URL, headers, timeouts and TLS
            settings for every lane; its pool of one connection).
        expiry: seconds a lane is kept unused.
    """

    def __init__(self, make: Callable[[], httpx2.AsyncClient], *,
                 expiry: float = KEEPALIVE_EXPIRY) -> None:
        self._make = make
        self._expiry = expiry
        self._free: collections.deque[_Lane] = collections.deque()
        self._all: set[_Lane] = set()
        self._closed = False

    def __len__(self) -> int:
        """Lanes open, lent or free."""
        return len(self._all)

    def take(self) -> _Lane:
        if self._free:
            return self._free.pop()
        if self._closed:
            raise RuntimeError("the lanes are closed")
        lane = _Lane(self._make())
        coalesce_writes(lane.client)
        self._all.add(lane)
        return lane

    def give(self, lane: _Lane) -> None:
        if not self._closed:  # a closed lane is dropped
            lane.idle_since = trio.current_time()
            self._free.append(lane)

    async def sweep(self) -> None:
        """Every ``expiry`` seconds, close the lanes unused that long."""
        while True:
            await trio.sleep(self._expiry)
            old = trio.current_time() - self._expiry
            while self._free and self._free[0].idle_since <= old:
                lane = self._free.popleft()
                self._all.discard(lane)
                await lane.client.aclose()

    async def aclose(self) -> None:
        """Close every lane, lent or not (their requests fail as on a closed
        client)."""
        self._closed = True
        self._free.clear()
        lanes, self._all = self._all, set()
        with trio.CancelScope(shield=True):
            for lane in lanes:
                await lane.client.aclose()


class HttpBackend(Backend):
    """Base of the backends that talk to a model server over HTTP.

    Args:
        name: the model's name on this node.
        base_url: the server's base URL.
        remote_model: the model's name on the server.
        slots: requests sent to the server at once.
        timeout: seconds allowed between two reads of a response (and for
            writes and the connection pool).
        connect_timeout: seconds allowed to connect.
        probe_interval: seconds between two catalog probes.
        transport: an httpx2 transport to use instead of the network.
        headers: sent with every request (authorization).
    """

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        remote_model: str,
        slots: int = 4,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        probe_interval: float = 30.0,
        transport: httpx2.AsyncBaseTransport | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(name, slots=slots)
        self.base_url = base_url.rstrip("/")
        self.remote_model = remote_model
        self.timeout = httpx2.Timeout(timeout, connect=connect_timeout)
        self.probe_interval = probe_interval
        self._transport = transport
        self._headers = dict(headers or {})
        self._lanes: ClientLanes | None = None
        self._ssl: ssl.SSLContext | None = None
        self._stream_headers = {**self._headers, "content-type": "application/json",
                                "accept": "*/*"}
        url = httpx2.URL(self.base_url)
        if (url.username or url.password) and not any(
                k.lower() == "authorization" for k in self._headers):
            # Credentials in the URL (http://user:key@host) are sent as HTTP
            # Basic, as httpx2's client does for its other requests.
            pair = f"{url.username}:{url.password}".encode()
            self._stream_headers["authorization"] = "Basic " + base64.b64encode(pair).decode()

    @functools.cached_property
    def where(self) -> str:
        """The server, for messages (never the credentials)."""
        url = httpx2.URL(self.base_url)
        return f"{self.kind} server {url.scheme}://{url.host}{f':{url.port}' if url.port else ''}"

    def _new_client(self) -> httpx2.AsyncClient:
        """A lane's client: one connection, the TLS context every lane shares
        (made once: loading the CA bundle costs ~10 ms)."""
        if self._ssl is None:
            self._ssl = httpx2.create_ssl_context()
        return httpx2.AsyncClient(
            base_url=self.base_url + "/",
            timeout=self.timeout,
            transport=self._transport,
            headers=self._headers,
            verify=self._ssl,
            limits=ONE_CONNECTION,
        )

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Open the HTTP clients, then probe the catalog every
        ``probe_interval`` (every few seconds while the server is failing)."""
        lanes = self._lanes = ClientLanes(self._new_client)
        try:
            # The first lane now: settings a client refuses (a proxy URL in
            # the environment, a CA file) stop the backend at its start.
            lanes.give(lanes.take())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lanes.sweep)
                task_status.started()
                while True:
                    await self.probe()
                    interval = self.probe_interval
                    if self.state is not ModelState.LOADED:
                        interval = min(interval, 5.0)
                    await trio.sleep(interval)
        finally:
            self._lanes = None
            await lanes.aclose()

    async def probe(self) -> None:
        """Ask the server for its catalog and set the model's state from it."""
        try:
            infos = await self.list_models()
        except P2PInferError as exc:
            if self.state is not ModelState.ERROR:
                log.warning("model %s: %s", self.name, exc.message)
            self._set_state(ModelState.ERROR, exc.message)
            return
        except Exception as exc:  # a probe must never take the node down
            log.exception("model %s: catalog probe failed", self.name)
            self._set_state(ModelState.ERROR, f"catalog probe failed: {type(exc).__name__}")
            return
        names = {info.name for info in infos}
        if self.remote_model in names or f"{self.remote_model}:latest" in names:
            for info in infos:
                if info.name in (self.remote_model, f"{self.remote_model}:latest"):
                    self.context_length = info.context_length or self.context_length
            self._set_state(ModelState.LOADED)
        else:
            self._set_state(
                ModelState.ERROR, f"the {self.where} does not list model {self.remote_model!r}"
            )

    def _take_lane(self) -> tuple[ClientLanes, _Lane]:
        lanes = self._lanes
        if lanes is None:
            raise BackendUnavailable(f"model {self.name}: backend is not running")
        return lanes, lanes.take()

    async def get_json(self, path: str) -> Any:
        """GET ``path`` and decode its JSON body, with our errors."""
        what = f"GET {path} on the {self.where}"
        lanes, lane = self._take_lane()
        try:
            response = await lane.client.get(path.lstrip("/"))
        except httpx2.HTTPError as exc:
            raise translate_http_error(exc, what) from exc
        finally:
            lanes.give(lane)
        if response.status_code >= 400:
            raise error_for_status(response, response.content, what, model=self.name)
        try:
            return response.json()
        except ValueError as exc:
            raise MalformedBackendResponse(f"{what}: not JSON") from exc

    async def post_json(self, path: str, body: dict[str, Any]) -> Any:
        """POST ``body`` to ``path`` and decode the JSON answer, with our errors."""
        what = f"POST {path} on the {self.where}"
        lanes, lane = self._take_lane()
        try:
            response = await lane.client.post(path.lstrip("/"), json=body)
        except httpx2.HTTPError as exc:
            raise translate_http_error(exc, what) from exc
        finally:
            lanes.give(lane)
        if response.status_code >= 400:
            raise error_for_status(response, response.content, what, model=self.name)
        try:
            return response.json()
        except ValueError as exc:
            raise MalformedBackendResponse(f"{what}: not JSON") from exc

    @asynccontextmanager
    async def open_stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[
            AsyncIterator[str]]:
        """POST ``body`` to ``path`` and yield the response's lines.

        Every failure, before or during the stream, is raised as our error;
        a server that is reachable again after a failure marks the model
        loaded.

        Every answer takes this path, so it goes to a lane's transport for
        the URL directly (its connection, or a proxy from the environment):
        httpx2's request and response types, timeouts and error mapping,
        without the client's per-request work (merging URLs, headers and
        cookies, auth and redirect flows, event hooks), which cost the
        worker ~0.3 ms of CPU an answer
        (benchmarks/compare_backend_clients.py). Credentials in the base
        URL are sent as HTTP Basic, as the client would.
        """
        what = f"POST {path} on the {self.where}"
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":"),
                             allow_nan=False).encode()
        lanes, lane = self._take_lane()
        try:
            url, transport = lane.target(self.base_url, path)
            request = httpx2.Request("POST", url, headers=self._stream_headers,
                                     content=content,
                                     extensions={"timeout": self.timeout.as_dict()})
            response = await transport.handle_async_request(request)
            try:
                if response.status_code >= 400:
                    body_start = b""
                    async for piece in response.aiter_bytes():
                        body_start += piece
                        if len(body_start) >= MAX_ERROR_BODY:
                            break
                    raise error_for_status(response, body_start, what, model=self.name)
                self._set_state(ModelState.LOADED)
                lines = _lines(response, what)
                yield lines
                # The caller read the answer to its end marker ([DONE], done:
                # true) and left without an error: read the rest of the body
                # too (normally only the end of the chunked encoding), or the
                # connection is closed instead of kept, and every request
                # pays for a new TCP connection to the server.
                with trio.move_on_after(DRAIN_TIMEOUT):
                    async for _ in lines:
                        pass
            finally:
                await response.aclose()
        except httpx2.HTTPError as exc:
            err = translate_http_error(exc, what)
            if isinstance(err, BackendUnavailable):
                self._set_state(ModelState.ERROR, err.message)
            raise err from exc
        finally:
            lanes.give(lane)


class _CoalescingStream(httpcore2.AsyncNetworkStream):
    """A connection whose writes wait for the next read (or close, or
    :data:`COALESCE_LIMIT` bytes): a request's head and its body leave in
    one send.

    httpcore2 writes an HTTP/1.1 request's head and body separately, and the
    server wakes for each: on loopback, with the server on the same core,
    that is a second system call and a second switch to the server and back
    for every answer (~2.3 switches an answer with a server on the worker's
    core, benchmarks/RESULTS.md). A client always reads after sending a
    request, so holding the writes until then changes nothing else; a large
    body still leaves in pieces of about :data:`COALESCE_LIMIT` bytes."""

    def __init__(self, stream: httpcore2.AsyncNetworkStream) -> None:
        self._stream = stream
        self._held: list[bytes] = []
        self._size = 0
        self._timeout: float | None = None

    async def _flush(self) -> None:
        if self._held:
            data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
            self._held.clear()
            self._size = 0
            await self._stream.write(data, timeout=self._timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        self._held.append(buffer)
        self._size += len(buffer)
        self._timeout = timeout
        if self._size >= COALESCE_LIMIT:
            await self._flush()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        await self._flush()
        return await self._stream.read(max_bytes, timeout=timeout)

    async def aclose(self) -> None:
        self._held.clear()  # a closed connection's request is not sent
        await self._stream.aclose()

    async def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore2.AsyncNetworkStream:  # noqa: ASYNC109
        await self._flush()  # (a proxy's CONNECT is read first anyway)
        return _CoalescingStream(
            await self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _CoalescingBackend(httpcore2.AsyncNetworkBackend):
    """Connections as ``backend`` makes them, each a :class:`_CoalescingStream`.
    (The ``timeout`` arguments are httpcore2's interface.)"""

    def __init__(self, backend: httpcore2.AsyncNetworkBackend) -> None:
        self._backend = backend

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
                          local_address: str | None = None,
                          socket_options: Any = None) -> httpcore2.AsyncNetworkStream:
        return _CoalescingStream(await self._backend.connect_tcp(
            host, port, timeout=timeout, local_address=local_address,
            socket_options=socket_options))

    async def connect_unix_socket(self, path: str, timeout: float | None = None,  # noqa: ASYNC109
                                  socket_options: Any = None) -> httpcore2.AsyncNetworkStream:
        return _CoalescingStream(await self._backend.connect_unix_socket(
            path, timeout=timeout, socket_options=socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


def coalesce_writes(client: httpx2.AsyncClient) -> int:
    """Make each of ``client``'s connection pools (its own, and those of the
    proxies the environment names) send a request's head and body together
    (:class:`_CoalescingStream`); returns how many pools it changed.

    httpx2 has no setting for the network backend of the pools it builds,
    so this replaces it on each: a transport of another kind (a test's
    :class:`httpx2.MockTransport`), or an httpx2 whose pools are built
    differently, is left as it is, and requests are sent as before."""
    changed = 0
    for transport in (client._transport, *client._mounts.values()):
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if isinstance(backend, httpcore2.AsyncNetworkBackend) and not isinstance(
                backend, _CoalescingBackend):
            pool._network_backend = _CoalescingBackend(backend)  # type: ignore[union-attr]
            changed += 1
    return changed


async def _lines(response: httpx2.Response, what: str) -> AsyncIterator[str]:
    """The body's lines (``\n``, ``\r\n`` or ``\r`` ends one, as in
    server-sent events), each at most :data:`MAX_LINE` bytes; a last line
    without its end is yielded too."""
    pending = b""
    async for chunk in response.aiter_bytes():
        buf = pending + chunk
        if b"\r" in buf:
            # A \r at the very end may be the first half of a \r\n: keep it.
            held = buf.endswith(b"\r")
            buf = buf[:-1] if held else buf
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (b"\r" if held else b"")
        *lines, pending = buf.split(b"\n")
        for line in lines:
            yield line.decode("utf-8", errors="replace")
        if len(pending) > MAX_LINE:
            raise MalformedBackendResponse(f"{what}: a stream line of over {MAX_LINE} bytes")
    if pending.rstrip(b"\r"):
        yield pending.rstrip(b"\r").decode("utf-8", errors="replace")
