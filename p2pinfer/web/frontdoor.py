"""A front-door process: the web app on uvicorn, reaching the swarm through its node.

The web role of a node with ``[web] workers`` > 0 opens the HTTP(S)
listening socket itself and starts that many of these processes (``python
-m p2pinfer.web.frontdoor``), handing each the socket and, on its standard
input, what it needs as JSON: the ``[web]`` settings, the node's peer id,
the CSRF key, the path of the node's local socket. Each process serves the
same app as the node would (:class:`~p2pinfer.web.site.WebSite`) on
uvicorn (uvloop, httptools: HTTP parsed in C, on a core of its own), and
the app's :class:`~p2pinfer.web.upstream.WebUpstream` is
:class:`RemoteUpstream`: the node's ``web.*`` methods
(:mod:`~p2pinfer.web.frontdoor_service`) over its local socket, which the
node serves as calls from itself. The process writes ``ready`` on its
standard output once it serves.

The kernel hands each new connection to one of the processes accepting on
the shared socket. A client that goes away cancels its request at once:
the app cancels the stream on the local socket, the node the gateway's
call, the gateway the worker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
from collections import Counter
from collections.abc import Mapping
from typing import Any

from ..credentials import Principal
from ..errors import MalformedFrame, NoWorkerAvailable
from ..rpc.aio import AioRpcClient, AioRpcStream
from .inputs import current_source
from .settings import WebSettings
from .upstream import _END, InferenceCall, ModelCatalog

__all__ = ["RemoteUpstream", "RequestCounts", "main", "serve"]

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 1.0


def _principal(data: Any) -> Principal:
    if not isinstance(data, dict):
        raise MalformedFrame("the node sent a principal that is not a map")
    return Principal(user_id=str(data["user_id"]), username=str(data.get("username", "")),
                     tier=str(data.get("tier", "default")), is_admin=bool(data.get("is_admin")),
                     api_key_id=data.get("api_key_id"), via=data.get("via", "token"))


class RemoteUpstream:
    """:class:`~p2pinfer.web.upstream.WebUpstream` over the node's local
    socket (see the module docstring).

    An inference request goes straight to the node's own gateway
    (``processInferenceRequest`` on the local socket) when the node runs
    one, instead of through the web role's relay. Credentials are checked
    by the node on every request, never cached here (a cached answer would
    let a key locked out there through): by its gateway with the request
    itself (the model list is cached here; see ``ModelCatalog.resolve``),
    or by ``web.authenticate``; the node's roles share one authenticator,
    so its throttles are the same whichever checks.

    Args:
        rpc: a client connected to the node's local socket.
        node_roles: the roles the node runs.
        models_ttl: seconds the model list is reused.
        call_timeout: seconds for a unary call.
        request_timeout: seconds an inference request may take.
    """

    def __init__(self, rpc: AioRpcClient, *, node_roles: frozenset[str] = frozenset(),
                 models_ttl: float, call_timeout: float, request_timeout: float) -> None:
        self.rpc = rpc
        self.node_roles = node_roles
        self.call_timeout = call_timeout
        self.request_timeout = request_timeout
        self.catalog = ModelCatalog(self, models_ttl)

    def _params(self, **params: Any) -> dict[str, Any]:
        source = current_source.get()
        if source is not None:
            params["source"] = source
        return params

    async def _call(self, method: str, *, long: bool = False, **params: Any) -> Any:
        return await self.rpc.call(
            method, self._params(**params),
            timeout=self.request_timeout if long else self.call_timeout)

    async def authenticate(self, auth: dict[str, str]) -> Principal:
        return _principal(await self._call("web.authenticate", auth=auth))

    async def session(self, token: str) -> Principal:
        return _principal(await self._call("web.session", token=token))

    async def wait_for_user(self, user_id: str) -> None:
        await self._call("web.waitForUser", user_id=user_id)

    async def peers(self, role: str) -> list[str]:
        return [str(p) for p in await self._call("web.peers", role=role)]

    async def call(self, role: str, method: str, params: Any = None, *,
                   long: bool = False) -> Any:
        return await self.rpc.call(
            "web.call", self._params(role=role, method=method, params=params, long=long),
            timeout=self.request_timeout if long else self.call_timeout)

    async def embed(self, request: dict[str, Any], auth: dict[str, str]) -> dict[str, Any]:
        result = await self._call("web.embed", long=True, request=request, auth=auth)
        if not isinstance(result, dict):
            raise MalformedFrame("the node's embeddings are not a map")
        return result

    async def inference(self, request: dict[str, Any], auth: dict[str, str], *,
                        stream: bool = True) -> InferenceCall:
        if "gateway" not in self.node_roles:
            return await self._open("web.inference",
                                    self._params(request=request, auth=auth, stream=stream))
        if not stream:
            request = {**request, "stream": False}
        try:
            return await self._open("processInferenceRequest",
                                    self._params(request=request, auth=auth))
        except NoWorkerAvailable as exc:
            await self.catalog.check_served(exc, auth)
            raise

    async def _open(self, method: str, params: dict[str, Any]) -> InferenceCall:
        rpc_stream: AioRpcStream = self.rpc.stream(method, params,
                                                   timeout=self.request_timeout)
        await rpc_stream.__aenter__()
        try:
            try:
                first: Any = await rpc_stream.__anext__()
            except StopAsyncIteration:
                first = _END
        except BaseException:
            await rpc_stream.__aexit__(None, None, None)
            raise
        trailer = rpc_stream.trailer if first is _END else None
        gateway = str((trailer or {}).get("gateway") or "")
        return InferenceCall(rpc_stream, first, gateway)

    async def account(self, user_id: str, *, since: str, logs: int) -> dict[str, Any]:
        result = await self._call("web.account", user_id=user_id, since=since, logs=logs)
        if not isinstance(result, dict):
            raise MalformedFrame("the node's account data is not a map")
        return result

    async def members(self) -> list[dict[str, Any]]:
        result = await self._call("web.members")
        return [m for m in result if isinstance(m, dict)] if isinstance(result, list) else []


class RequestCounts:
    """HTTP requests counted in this process and added to the node's metrics
    every :data:`FLUSH_INTERVAL` seconds (``web.countRequests``)."""

    def __init__(self) -> None:
        self.pending: Counter[tuple[str, str, str]] = Counter()

    def count_request(self, service: str, method: str, status: str, n: int = 1) -> None:
        self.pending[(service, method, status)] += n

    async def flush_forever(self, rpc: AioRpcClient) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            await self.flush(rpc)

    async def flush(self, rpc: AioRpcClient) -> None:
        if not self.pending:
            return
        counts, self.pending = self.pending, Counter()
        try:
            await rpc.call("web.countRequests", {
                "counts": [[s, m, st, n] for (s, m, st), n in counts.items()]}, timeout=5.0)
        except Exception as exc:  # counted again next time rather than lost
            self.pending.update(counts)
            log.warning("front door: could not hand request counts to the node: %s", exc)


# -- the process ---------------------------------------------------------------------
def guarded_protocol(header_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, closing a connection whose request line
    and headers have not all arrived ``header_timeout`` seconds after it
    opened or after the request's first byte.

    uvicorn times only the idle wait between requests: a client sending its
    headers a byte at a time (or nothing at all after connecting) would
    hold the connection for ever. Hypercorn, in the node, has the same rule
    (its idle timer runs until the headers are in).
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedHttpToolsProtocol


async def serve(spec: Mapping[str, Any]) -> None:
    """Serve the web app on the listening socket ``spec["fd"]`` until
    SIGTERM, or until the node's local socket closes (the node stopped)."""
    import uvicorn

    from .site import WebSite

    settings = WebSettings.from_wire(spec["settings"])
    rpc = await AioRpcClient.connect(spec["socket"])
    counts = RequestCounts()
    upstream = RemoteUpstream(rpc, node_roles=frozenset(spec.get("roles", ())),
                              models_ttl=settings.models_ttl,
                              call_timeout=settings.call_timeout,
                              request_timeout=settings.request_timeout)
    tls = spec.get("tls")
    site = WebSite(settings, upstream, peer_id=str(spec["peer_id"]), metrics=counts,
                   csrf_key=bytes.fromhex(spec["csrf_key"]), tls=tls is not None)
    site.url = spec.get("url")
    sock = socket.socket(fileno=int(spec["fd"]))
    # proxy_headers=False: uvicorn would otherwise take the client's address
    # from X-Forwarded-For (and the scheme from X-Forwarded-Proto) on any
    # connection from 127.0.0.1, so a local client could pose as any address
    # and escape the per-address throttles. Hypercorn, in the node, never
    # reads them either.
    config = uvicorn.Config(
        site.app, http=guarded_protocol(settings.idle_timeout), lifespan="off",
        proxy_headers=False,
        access_log=False, log_config=None, server_header=False,
        timeout_keep_alive=max(1, round(settings.idle_timeout)), timeout_graceful_shutdown=1,
        ssl_certfile=tls["cert"] if tls else None, ssl_keyfile=tls["key"] if tls else None)
    server = uvicorn.Server(config)

    async def watch() -> None:
        while not server.started:  # noqa: ASYNC110 (uvicorn has a flag, no event)
            await asyncio.sleep(0.01)
        print("ready", flush=True)
        await rpc.wait_closed()
        log.warning("front door %d: the node's local socket closed; stopping", os.getpid())
        server.should_exit = True

    tasks = [asyncio.create_task(watch()), asyncio.create_task(counts.flush_forever(rpc))]
    try:
        await server.serve(sockets=[sock])
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await counts.flush(rpc)
        await rpc.aclose()


def main() -> None:
    """``python -m p2pinfer.web.frontdoor``: the spec as JSON on stdin."""
    spec = json.loads(sys.stdin.readline())
    logging.basicConfig(level=spec.get("log_level", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[front door "
                               f"{os.getpid()}]: %(message)s")
    import uvloop

    uvloop.run(serve(spec))


if __name__ == "__main__":
    main()
