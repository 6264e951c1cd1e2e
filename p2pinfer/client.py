"""The Python SDK: :class:`Client` (async, trio) and :class:`SyncClient`.

A client needs an API key and a way in:

- **peer-to-peer** (``bootstrap=[multiaddr, ...]``): the client runs a small
  libp2p host of its own (Noise-encrypted, like every node), dials a
  bootstrap node, finds the swarm's gateways and calls them. It is not a
  network member and needs no certificate: the API key authenticates each
  request.
- **HTTP** (``base_url="http://host:3000"``): any node with the web role.

::

    async with Client(bootstrap=["/ip4/10.0.0.2/tcp/4001/p2p/12D3KooW..."],
                      api_key="p2p_...") as client:
        response = await client.inference(prompt="Explain quantum computing",
                                          model="smollm2", max_tokens=100)
        print(response.text, response.usage)
        async with client.stream(prompt="Write a poem about AI") as stream:
            async for text in stream:
                print(text, end="")

Environment defaults: ``P2PINFER_BOOTSTRAP`` (comma-separated),
``P2PINFER_URL``, ``P2PINFER_API_KEY``.
"""

from __future__ import annotations

import math
import os
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from .errors import (
    AuthenticationRequired,
    ConfigError,
    NoWorkerAvailable,
    P2PInferError,
    PeerUnavailable,
    StreamBroken,
)
from .identity import Identity

__all__ = ["Client", "InferenceResponse", "InferenceStream", "SyncClient"]

GATEWAY_REFRESH = 30.0


@dataclass
class InferenceResponse:
    """One answer. ``usage`` holds the backend's own token counts."""

    text: str
    model: str | None = None
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    request_id: str | None = None
    worker: str | None = None
    latency_ms: float | None = None
    cached: bool = False

    @classmethod
    def from_trailer(cls, text: str, trailer: dict[str, Any] | None) -> InferenceResponse:
        t = trailer or {}
        usage = t.get("usage") if isinstance(t.get("usage"), dict) else {}
        return cls(text=text, model=t.get("model"), finish_reason=t.get("finish_reason"),
                   usage={k: int(v) for k, v in (usage or {}).items() if isinstance(v, int)},
                   request_id=t.get("request_id"), worker=t.get("worker"),
                   latency_ms=t.get("latency_ms"), cached=bool(t.get("cached", False)))


def _request(prompt: str | None, messages: list[dict[str, str]] | None,
             options: dict[str, Any]) -> dict[str, Any]:
    if (prompt is None) == (messages is None):
        from .errors import InvalidParams

        raise InvalidParams("give either prompt or messages", data={"field": "prompt"})
    out: dict[str, Any] = {"prompt": prompt} if prompt is not None else {"messages": messages}
    for key, value in options.items():
        if value is not None:
            out[key] = value
    return out


class InferenceStream:
    """Text deltas of one answer as they arrive; :attr:`response` once done."""

    def __init__(self, client: Client, request: dict[str, Any]) -> None:
        self._client = client
        self._request = request
        self._rpc_stream: Any = None
        self._http: Any = None
        self._parts: list[str] = []
        self.response: InferenceResponse | None = None

    async def __aenter__(self) -> InferenceStream:
        self._rpc_stream, self._http = await self._client._open_stream(self._request)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._rpc_stream is not None:
            await self._rpc_stream.__aexit__(*exc)
        if self._http is not None:
            await self._http.aclose()

    def __aiter__(self) -> InferenceStream:
        return self

    async def __anext__(self) -> str:
        if self._rpc_stream is not None:
            try:
                chunk = await self._rpc_stream.__anext__()
            except StopAsyncIteration:
                self.response = InferenceResponse.from_trailer(
                    "".join(self._parts), self._rpc_stream.trailer)
                raise
            text = str(chunk.get("delta", "")) if isinstance(chunk, dict) else str(chunk)
            self._parts.append(text)
            return text
        assert self._http is not None
        event = await self._http.next_event()
        if event is None:
            self.response = self._http.response(self._parts)
            raise StopAsyncIteration
        self._parts.append(event)
        return str(event)


class Client:
    """Async client for a p2pinfer swarm (see the module docstring).

    Args:
        bootstrap: multiaddrs (ending in ``/p2p/<peer id>``) of nodes to dial.
        base_url: a web node's URL, to use HTTP instead of libp2p.
        api_key: the API key that authenticates every request.
        token: a session token instead of an API key.
        identity: the client's libp2p key (a fresh one by default).
        verify: HTTPS certificate check: True, False or a CA bundle path.
    """

    def __init__(
        self,
        *,
        bootstrap: Sequence[str] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        token: str | None = None,
        identity: Identity | None = None,
        verify: bool | str = True,
    ) -> None:
        env_boot = os.environ.get("P2PINFER_BOOTSTRAP", "")
        self.bootstrap = list(bootstrap) if bootstrap is not None else \
            [a.strip() for a in env_boot.split(",") if a.strip()]
        self.base_url = base_url or (None if self.bootstrap else os.environ.get("P2PINFER_URL"))
        self.api_key = api_key or os.environ.get("P2PINFER_API_KEY")
        self.token = token
        self.identity = identity
        self.verify = verify
        if not self.bootstrap and not self.base_url:
            raise ConfigError("a client needs bootstrap addresses or a base_url "
                              "(or P2PINFER_BOOTSTRAP / P2PINFER_URL)")
        self._host: Any = None
        self._rpc: Any = None
        self._http: Any = None
        self._gateways: list[str] = []
        self._gateways_at = -math.inf
        self._exit: Any = None

    @property
    def auth(self) -> dict[str, str]:
        if self.token:
            return {"token": self.token}
        if self.api_key:
            return {"api_key": self.api_key}
        raise AuthenticationRequired("no API key (pass api_key= or set P2PINFER_API_KEY)")

    # -- lifecycle -------------------------------------------------------------------
    async def __aenter__(self) -> Client:
        from contextlib import AsyncExitStack

        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            if self.base_url:
                import httpx

                self._http = await stack.enter_async_context(httpx.AsyncClient(
                    base_url=self.base_url.rstrip("/"), verify=self.verify, timeout=None))
            else:
                import multiaddr

                from .rpc import RpcClient, make_host

                self._host = make_host(self.identity or Identity.generate())
                await stack.enter_async_context(self._host.run(
                    listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
                self._rpc = await stack.enter_async_context(RpcClient.open(self._host))
        except BaseException:
            await stack.aclose()
            raise
        self._exit = stack
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._exit is not None:
            await self._exit.__aexit__(*exc)  # type: ignore[arg-type]
            self._exit = None

    # -- finding gateways ---------------------------------------------------------------
    async def gateways(self) -> list[str]:
        """Peer ids of reachable gateways (refreshed every 30 s)."""
        if self._gateways and trio.current_time() - self._gateways_at < GATEWAY_REFRESH:
            return self._gateways
        from .discovery import Descriptor

        found: list[str] = []
        errors: list[str] = []
        for addr in self.bootstrap:
            try:
                with trio.fail_after(10):
                    peer = await self._rpc.connect(addr)
                    own = Descriptor.from_wire(await self._rpc.call(peer, "getDescriptor"))
                    if "gateway" in own.roles and peer not in found:
                        found.append(peer)
                    for raw in await self._rpc.call(peer, "findPeers", {"role": "gateway"}):
                        desc = Descriptor.from_wire(raw)
                        if desc.peer_id not in found:
                            self._remember(desc)
                            found.append(desc.peer_id)
            except (P2PInferError, trio.TooSlowError) as exc:
                errors.append(f"{addr}: {exc}")
        if not found:
            raise NoWorkerAvailable("no gateway reachable through the bootstrap nodes: "
                                    + "; ".join(errors or ["none answered"]),
                                    data={"retry_after": 2.0})
        self._gateways = found
        self._gateways_at = trio.current_time()
        return found

    def _remember(self, desc: Any) -> None:
        from libp2p.peer.id import ID

        from .rpc.host import parse_multiaddr

        addrs = [parse_multiaddr(a).decapsulate(parse_multiaddr(f"/p2p/{desc.peer_id}"))
                 for a in desc.addrs]
        self._host.get_peerstore().add_addrs(ID.from_base58(desc.peer_id), addrs, 600)

    async def _call(self, method: str, params: dict[str, Any]) -> Any:
        if self._http is not None:
            raise RuntimeError("internal: _call is the peer-to-peer path")
        gateways = list(await self.gateways())
        random.shuffle(gateways)
        last: P2PInferError | None = None
        for peer in gateways:
            try:
                return await self._rpc.call(peer, method, params)
            except (PeerUnavailable, StreamBroken) as exc:
                last = exc
                self._gateways_at = -math.inf
        raise last or NoWorkerAvailable("no gateway answered")

    # -- the API -------------------------------------------------------------------------
    async def inference(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        system: str | None = None,
    ) -> InferenceResponse:
        """Ask for a whole answer (the design document's ``inference``)."""
        async with self.stream(prompt, messages=messages, model=model, max_tokens=max_tokens,
                               temperature=temperature, top_p=top_p, stop=stop, seed=seed,
                               system=system) as stream:
            async for _ in stream:
                pass
        assert stream.response is not None
        return stream.response

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        system: str | None = None,
    ) -> InferenceStream:
        """An answer as it is generated: ``async with client.stream(...) as s``."""
        request = _request(prompt, messages, {
            "model": model, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p, "stop": stop, "seed": seed, "system": system})
        return InferenceStream(self, request)

    async def _open_stream(self, request: dict[str, Any]) -> tuple[Any, Any]:
        if self._http is not None:
            from ._http import HttpStream

            return None, await HttpStream.open(self._http, request, self._http_headers())
        gateways = list(await self.gateways())
        random.shuffle(gateways)
        last: P2PInferError | None = None
        for peer in gateways:
            stream = self._rpc.stream(peer, "processInferenceRequest",
                                      {"request": request, "auth": self.auth})
            try:
                await stream.__aenter__()
                return stream, None
            except (PeerUnavailable, StreamBroken) as exc:
                last = exc
                self._gateways_at = -math.inf
        raise last or NoWorkerAvailable("no gateway answered")

    def _http_headers(self) -> dict[str, str]:
        if self.token:
            return {"Authorization": f"Bearer {self.token}"}
        if self.api_key:
            return {"X-API-Key": self.api_key}
        raise AuthenticationRequired("no API key (pass api_key= or set P2PINFER_API_KEY)")

    async def models(self) -> list[dict[str, Any]]:
        """Models served in the swarm."""
        if self._http is not None:
            from ._http import get_json

            return list((await get_json(self._http, "/api/models", self._http_headers()))
                        ["models"])
        return list((await self._call("listModels", {"auth": self.auth}))["models"])

    async def quota(self) -> dict[str, Any]:
        """Requests and tokens used in the current window, and the limits."""
        if self._http is not None:
            from ._http import get_json

            return dict(await get_json(self._http, "/api/quota", self._http_headers()))
        return dict(await self._call("getUserQuota", {"auth": self.auth}))

    async def usage(self, *, since: str | None = None, until: str | None = None
                    ) -> list[dict[str, Any]]:
        """Usage per day and key (from the replicated ledger)."""
        params: dict[str, Any] = {"auth": self.auth}
        if since:
            params["since"] = since
        if until:
            params["until"] = until
        if self._http is not None:
            from ._http import get_json

            query = {k: v for k, v in (("since", since), ("until", until)) if v}
            return list((await get_json(self._http, "/api/usage", self._http_headers(),
                                        params=query))["usage"])
        return list((await self._call("getUsage", params))["usage"])

    async def health(self) -> dict[str, Any]:
        """A gateway's view of the swarm."""
        if self._http is not None:
            from ._http import get_json

            return dict(await get_json(self._http, "/api/health", {}))
        return dict(await self._call("getServiceHealth", {}))


class SyncClient:
    """A blocking :class:`Client` for plain scripts and asyncio programs.

    It runs trio in a background thread of its own, so it works whether or
    not the calling thread already runs an event loop (asyncio's included)::

        with SyncClient(bootstrap=[...], api_key="p2p_...") as client:
            print(client.inference(prompt="Hello").text)
    """

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._token: Any = None
        self._thread: threading.Thread | None = None
        self._client: Client | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def __enter__(self) -> SyncClient:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        if self._thread is not None:
            return
        client = Client(**self._kwargs)  # argument errors surface here, in the caller

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            try:
                async with client:
                    self._client = client
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as exc:  # report start-up failures to open()
                self._error = exc
                self._ready.set()

        self._thread = threading.Thread(target=trio.run, args=(main,), daemon=True,
                                        name="p2pinfer-sync-client")
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            error, self._error = self._error, None
            self._thread.join()
            self._thread = None
            raise error

    def close(self) -> None:
        if self._thread is None:
            return
        stop = self._stop
        if stop is not None:
            trio.from_thread.run_sync(stop.set, trio_token=self._token)
        self._thread.join(timeout=10)
        self._thread = None
        self._client = None

    def _run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._client is None:
            self.open()
        assert self._client is not None
        fn = getattr(self._client, method)
        return trio.from_thread.run(lambda: fn(*args, **kwargs), trio_token=self._token)

    def inference(self, prompt: str | None = None, **kwargs: Any) -> InferenceResponse:
        return self._run("inference", prompt, **kwargs)  # type: ignore[no-any-return]

    def stream(self, prompt: str | None = None, **kwargs: Any) -> list[str]:
        """The answer's text deltas (collected; use :class:`Client` to consume
        them as they arrive)."""
        async def collect() -> list[str]:
            assert self._client is not None
            async with self._client.stream(prompt, **kwargs) as stream:
                return [part async for part in stream]

        if self._client is None:
            self.open()
        return trio.from_thread.run(collect, trio_token=self._token)  # type: ignore[no-any-return]

    def models(self) -> list[dict[str, Any]]:
        return self._run("models")  # type: ignore[no-any-return]

    def quota(self) -> dict[str, Any]:
        return self._run("quota")  # type: ignore[no-any-return]

    def usage(self, **kwargs: Any) -> list[dict[str, Any]]:
        return self._run("usage", **kwargs)  # type: ignore[no-any-return]

    def health(self) -> dict[str, Any]:
        return self._run("health")  # type: ignore[no-any-return]

