"""The Python SDK: :class:`Client` (async, trio) and :class:`SyncClient`.

A client needs a way in and, for most calls, a credential:

- **peer-to-peer** (``bootstrap=[multiaddr, ...]``): the client runs a small
  libp2p host of its own (Noise-encrypted, like every node), dials a
  bootstrap node, finds the swarm's gateways (and auth nodes) and calls
  them. It is not a network member and needs no certificate: the API key or
  session token authenticates each request. It sends a credential only to a
  node whose certificate, signed by the network owner, grants the role it
  is asked for: the owner key is the one the bootstrap node proves its own
  membership with, and ``network="p2p-..."`` (env ``P2PINFER_NETWORK``)
  pins which network that must be. A node that cannot show one is never
  called (``UntrustedPeer`` when no node is left).
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

Accounts: :meth:`Client.register`, :meth:`Client.login` (the client then
uses the session token), :meth:`Client.refresh`, :meth:`Client.logout`,
:meth:`Client.create_api_key`, :meth:`Client.api_keys`,
:meth:`Client.revoke_api_key`, :meth:`Client.me`.

Errors are :class:`~p2pinfer.errors.P2PInferError` subclasses, the same in
both modes (``RateLimited``, ``InvalidApiKey``, ``PeerUnavailable``, ...),
also when raised inside ``async with Client(...)``.

Environment defaults: ``P2PINFER_BOOTSTRAP`` (comma-separated),
``P2PINFER_URL``, ``P2PINFER_API_KEY``, ``P2PINFER_CA_FILE`` (a CA bundle
that HTTPS certificates are checked against; they always are).
"""

from __future__ import annotations

import json
import os
import random
import ssl
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from .errors import (
    AuthenticationRequired,
    ConfigError,
    InvalidParams,
    NotMember,
    NoWorkerAvailable,
    P2PInferError,
    PeerUnavailable,
    StreamBroken,
    UnknownMethod,
    UntrustedPeer,
)
from .identity import Identity
from .prompts import ToolCall, parse_tool_calls

if TYPE_CHECKING:  # pragma: no cover
    import httpx

    from .discovery import Descriptor

__all__ = ["Client", "EmbeddingResponse", "InferenceResponse", "InferenceStream", "SyncClient",
           "SyncStream"]

# Seconds a list of gateways (or other nodes) found through the bootstrap
# nodes is reused before asking again.
DISCOVERY_REFRESH = 30.0
GATEWAY_REFRESH = DISCOVERY_REFRESH
# Seconds to dial one bootstrap node and read its descriptor.
BOOTSTRAP_TIMEOUT = 10.0
ROLES = ("auth", "gateway", "inference", "metrics", "web")


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
    #: the tools the model called (``finish_reason`` is then ``"tool_calls"``)
    tool_calls: list[ToolCall] = field(default_factory=list)
    #: with ``logprobs=True``: each token's ``{token, logprob, bytes, top_logprobs}``
    logprobs: list[dict[str, Any]] | None = None
    #: everything the gateway reported (ttft_ms, worker_latency_ms, ...)
    details: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_trailer(cls, text: str, trailer: dict[str, Any] | None, *,
                     logprobs: list[dict[str, Any]] | None = None) -> InferenceResponse:
        """Build from the text and a gateway's trailer (RPC) or final line
        (HTTP), and the token log probabilities that came with the text."""
        t = trailer or {}
        raw_usage = t.get("usage")
        usage = raw_usage if isinstance(raw_usage, dict) else {}
        calls = list(parse_tool_calls(t["tool_calls"])) if t.get("tool_calls") else []
        return cls(text=text, model=t.get("model"), finish_reason=t.get("finish_reason"),
                   usage={k: int(v) for k, v in usage.items() if isinstance(v, int)},
                   request_id=t.get("request_id"), worker=t.get("worker"),
                   latency_ms=t.get("latency_ms"), cached=bool(t.get("cached", False)),
                   tool_calls=calls, logprobs=logprobs or None, details=dict(t))

    def message(self) -> dict[str, Any]:
        """The answer as the assistant message to put in the history (with
        its tool calls); answer each call with ``{"role": "tool",
        "tool_call_id": call.id, "content": ...}``."""
        out: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.tool_calls:
            out["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        return out

    def json(self) -> Any:
        """The answer parsed as JSON (ask with ``format`` to be sure it is)."""
        return json.loads(self.text)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (what ``p2pinfer prompt --json`` prints)."""
        out: dict[str, Any] = {
            "text": self.text, "model": self.model, "finish_reason": self.finish_reason,
            "usage": dict(self.usage), "request_id": self.request_id,
            "worker": self.worker, "latency_ms": self.latency_ms, "cached": self.cached}
        if self.tool_calls:
            out["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        return out


@dataclass
class EmbeddingResponse:
    """Embeddings of :meth:`Client.embed`: one vector per input text, in order."""

    vectors: list[list[float]]
    model: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    request_id: str | None = None
    worker: str | None = None


def _format(value: str | dict[str, Any] | None) -> Any:
    """The SDK's ``format`` (``"json"`` or a bare JSON schema, as Ollama
    takes it) in the prompt contract's form."""
    if isinstance(value, dict):
        return {"type": "json_schema", "schema": value}
    return value


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The SDK's ``tools``: p2pinfer's {name, description, parameters}, or
    OpenAI's {type: function, function: {...}} as most code has them."""
    if tools is None:
        return None
    return [t["function"] if isinstance(t, dict) and t.get("type") == "function"
            and isinstance(t.get("function"), dict) else t for t in tools]


def _tool_choice(choice: str | None) -> Any:
    """``"auto"``, ``"none"``, ``"required"`` or the name of a tool."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    return {"name": choice}


def _request(prompt: str | None, messages: list[dict[str, Any]] | None,
             options: dict[str, Any]) -> dict[str, Any]:
    if (prompt is None) == (messages is None):
        raise InvalidParams("give either prompt or messages", data={"field": "prompt"})
    out: dict[str, Any] = {"prompt": prompt} if prompt is not None else {"messages": messages}
    for key, value in options.items():
        if value is not None:
            out[key] = value
    return out


async def _close_host(host: Any) -> None:
    """Close the host's connections before its nursery ends: py-libp2p leaves
    them to the GC, and the nodes would see a silent socket instead of a
    client that left."""
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        try:
            await host.close()
        except Exception:  # closing is best effort: the process may be exiting
            return


def _sole_error(group: BaseExceptionGroup[Any]) -> BaseException | None:
    """The one exception inside (nested) single-member groups, else None.

    Trio nurseries (py-libp2p's host runs in one) wrap whatever leaves them
    in an ``ExceptionGroup``; a caller of the SDK should see the error itself.
    """
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


class InferenceStream:
    """Text deltas of one answer as they arrive; :attr:`response` once done."""

    def __init__(self, client: Client, request: dict[str, Any]) -> None:
        self._client = client
        self._request = request
        self._rpc_stream: Any = None
        self._http: Any = None
        self._parts: list[str] = []
        self._logprobs: list[dict[str, Any]] = []
        self.response: InferenceResponse | None = None

    async def __aenter__(self) -> InferenceStream:
        self._rpc_stream, self._http = await self._client._open_stream(self._request)
        return self

    async def __aexit__(self, *exc: Any) -> None:
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
                    "".join(self._parts), self._rpc_stream.trailer, logprobs=self._logprobs)
                raise
            if isinstance(chunk, dict) and isinstance(chunk.get("logprobs"), list):
                self._logprobs.extend(chunk["logprobs"])
            text = str(chunk.get("delta", "")) if isinstance(chunk, dict) else str(chunk)
            self._parts.append(text)
            return text
        if self._http is None:
            raise RuntimeError("use the stream as `async with client.stream(...) as s`")
        event = await self._http.next_event()
        if event is None:
            self.response = self._http.response(self._parts)
            raise StopAsyncIteration
        self._parts.append(event)
        return str(event)


def _ssl_verify(verify: bool | str) -> bool | ssl.SSLContext:
    """httpx's ``verify``: a CA bundle path becomes an SSL context trusting it."""
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    return verify


class Client:
    """Async client for a p2pinfer swarm (see the module docstring).

    Args:
        bootstrap: multiaddrs (ending in ``/p2p/<peer id>``) of nodes to dial.
        base_url: a web node's URL, to use HTTP instead of libp2p.
        api_key: the API key that authenticates every request.
        token: a session token instead of an API key (wins over ``api_key``).
        identity: the client's libp2p key (a fresh one by default).
        verify: HTTPS certificate check: True (the system's CAs), a CA bundle
            path (e.g. a node's self-signed ``ca.pem``) or False (never in
            production). Default: ``P2PINFER_CA_FILE`` if set, else True.
        transport: an ``httpx`` transport for HTTP mode (tests use
            ``httpx.MockTransport``).
        network: the network id the swarm must belong to (default:
            ``P2PINFER_NETWORK``, else the bootstrap node's).

    Raises:
        ConfigError: neither bootstrap addresses nor a base URL.
    """

    def __init__(
        self,
        *,
        bootstrap: Sequence[str] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        token: str | None = None,
        identity: Identity | None = None,
        verify: bool | str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        network: str | None = None,
    ) -> None:
        env_boot = os.environ.get("P2PINFER_BOOTSTRAP", "")
        if bootstrap is None and not base_url:
            bootstrap = [a.strip() for a in env_boot.split(",") if a.strip()]
        self.bootstrap = list(bootstrap or [])
        self.base_url = base_url or (None if self.bootstrap else os.environ.get("P2PINFER_URL"))
        self.api_key = api_key or os.environ.get("P2PINFER_API_KEY") or None
        self.token = token
        self.identity = identity
        self.verify: bool | str = (verify if verify is not None
                                   else os.environ.get("P2PINFER_CA_FILE") or True)
        self.transport = transport
        self.network = network or os.environ.get("P2PINFER_NETWORK") or None
        self._owner_key: bytes | None = None
        #: nodes not used because they showed no valid certificate, by peer id
        self.untrusted: dict[str, str] = {}
        if not self.bootstrap and not self.base_url:
            raise ConfigError("a client needs bootstrap addresses or a base_url "
                              "(or P2PINFER_BOOTSTRAP / P2PINFER_URL)")
        self._host: Any = None
        self._rpc: Any = None
        self._http: httpx.AsyncClient | None = None
        self._entry: dict[str, Descriptor] = {}   # bootstrap peer id -> its descriptor
        self._entry_errors: list[str] = []
        self._found: dict[str, tuple[float, list[Descriptor]]] = {}
        self._exit: AsyncExitStack | None = None

    @property
    def auth(self) -> dict[str, str]:
        """The credential sent with each request (``{"token"}`` or ``{"api_key"}``)."""
        if self.token:
            return {"token": self.token}
        if self.api_key:
            return {"api_key": self.api_key}
        raise AuthenticationRequired("no API key (pass api_key= or set P2PINFER_API_KEY)")

    @property
    def is_http(self) -> bool:
        """True when this client talks HTTP to a web node."""
        return self.base_url is not None and not self.bootstrap

    # -- lifecycle -------------------------------------------------------------------
    async def __aenter__(self) -> Client:
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            if self.is_http:
                import httpx

                assert self.base_url is not None
                self._http = await stack.enter_async_context(httpx.AsyncClient(
                    base_url=self.base_url.rstrip("/"), verify=_ssl_verify(self.verify),
                    timeout=None,
                    transport=self.transport))
            else:
                import multiaddr

                from .rpc import RpcClient, make_host

                self._host = make_host(self.identity or Identity.generate())
                await stack.enter_async_context(self._host.run(
                    listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
                stack.push_async_callback(_close_host, self._host)
                self._rpc = await stack.enter_async_context(RpcClient.open(self._host))
        except BaseException as exc:
            try:
                await stack.__aexit__(type(exc), exc, exc.__traceback__)
            except BaseExceptionGroup as group:
                raise (_sole_error(group) or group) from None
            raise
        self._exit = stack
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        stack, self._exit = self._exit, None
        self._http = None
        self._rpc = None
        if stack is None:
            return None
        try:
            return await stack.__aexit__(*exc)
        except BaseExceptionGroup as group:
            sole = _sole_error(group)
            if sole is None:
                raise
            raise sole from None

    def _need_open(self) -> None:
        if self._rpc is None and self._http is None:
            raise RuntimeError("use the client as `async with Client(...) as client`")

    # -- finding nodes ---------------------------------------------------------------------
    async def _entry_points(self) -> dict[str, Descriptor]:
        """Dial every bootstrap node (once) and read its descriptor."""
        self._need_open()
        if self._entry:
            return self._entry
        from .discovery import Descriptor

        errors: list[str] = []
        untrusted: list[str] = []
        for addr in self.bootstrap:
            try:
                with trio.fail_after(BOOTSTRAP_TIMEOUT):
                    peer = await self._rpc.connect(addr)
                    desc = Descriptor.from_wire(await self._rpc.call(peer, "getDescriptor"))
                self._trust_entry(desc)
                self._entry[peer] = desc
            except trio.TooSlowError:
                errors.append(f"{addr}: no answer within {BOOTSTRAP_TIMEOUT:.0f} s")
            except UntrustedPeer as exc:
                untrusted.append(f"{addr}: {exc.message}")
                self.untrusted[str(exc.data.get("peer_id", addr))] = exc.message
            except P2PInferError as exc:
                errors.append(f"{addr}: {exc.message}")
        self._entry_errors = errors + untrusted
        if not self._entry and untrusted:
            raise UntrustedPeer("no bootstrap node proves it is a member of the network: "
                                + "; ".join(untrusted), data={"bootstrap": list(self.bootstrap)})
        if not self._entry:
            raise PeerUnavailable("cannot reach any bootstrap node: " + "; ".join(errors),
                                  data={"bootstrap": list(self.bootstrap)})
        return self._entry

    def _trust_entry(self, desc: Descriptor) -> None:
        """Learn the owner key from a bootstrap node that proves, with it,
        that it is a member of the (pinned) network.

        Raises:
            UntrustedPeer: another network, or no valid certificate.
        """
        from .discovery import check_member_descriptor
        from .ledger.membership import network_id_for

        if self.network is not None and desc.network != self.network:
            raise UntrustedPeer(f"bootstrap node {desc.peer_id} is in network "
                                f"{desc.network[:64]!r}, not {self.network}",
                                data={"peer_id": desc.peer_id})
        proof = desc.member_proof()
        try:
            owner = bytes.fromhex(proof[0]) if proof else b""
        except ValueError:
            owner = b""
        if self._owner_key is not None and owner != self._owner_key:
            raise UntrustedPeer(f"bootstrap node {desc.peer_id} names another network owner",
                                data={"peer_id": desc.peer_id})
        if network_id_for(owner) != desc.network:
            raise UntrustedPeer(f"bootstrap node {desc.peer_id} shows no owner key of its "
                                "network", data={"peer_id": desc.peer_id})
        check_member_descriptor(desc, desc.network, owner)
        self.network, self._owner_key = desc.network, owner

    def _trusted(self, desc: Descriptor, role: str) -> bool:
        """Whether ``desc``'s certificate grants ``role`` in our network."""
        from .discovery import check_member_descriptor

        assert self.network is not None and self._owner_key is not None
        try:
            check_member_descriptor(desc, self.network, self._owner_key, role)
        except UntrustedPeer as exc:
            self.untrusted[desc.peer_id] = exc.message
            return False
        return True

    async def find(self, role: str) -> list[Descriptor]:
        """Descriptors of nodes with ``role`` that the bootstrap nodes know.

        A non-member client may look up only entry points (gateway and web
        nodes); other roles are found only among the bootstrap nodes
        themselves. Results are reused for 30 s.
        """
        if role not in ROLES:
            raise InvalidParams(f"role must be one of {', '.join(ROLES)}", data={"field": "role"})
        cached = self._found.get(role)
        if cached is not None and trio.current_time() - cached[0] < DISCOVERY_REFRESH:
            return cached[1]
        from .discovery import Descriptor

        entry = await self._entry_points()
        found: dict[str, Descriptor] = {p: d for p, d in entry.items()
                                        if role in d.roles and self._trusted(d, role)}
        for peer in list(entry):
            try:
                with trio.fail_after(BOOTSTRAP_TIMEOUT):
                    raws = await self._rpc.call(peer, "findPeers", {"role": role})
            except NotMember:
                continue  # this role is for network members to look up
            except (P2PInferError, trio.TooSlowError):
                continue
            for raw in raws if isinstance(raws, list) else []:
                try:
                    desc = Descriptor.from_wire(raw)
                except P2PInferError:
                    continue
                if (role in desc.roles and desc.peer_id not in found
                        and self._trusted(desc, role)):
                    self._remember(desc)
                    found[desc.peer_id] = desc
        result = sorted(found.values(), key=lambda d: d.peer_id)
        self._found[role] = (trio.current_time(), result)
        return result

    async def gateways(self) -> list[str]:
        """Peer ids of reachable gateways (refreshed every 30 s)."""
        gateways = [d.peer_id for d in await self.find("gateway")]
        if not gateways and self.untrusted:
            raise UntrustedPeer(
                "no gateway with a valid certificate of network "
                f"{self.network}: " + "; ".join(sorted(self.untrusted.values()))[:1000],
                data={"untrusted": sorted(self.untrusted)})
        if not gateways:
            raise NoWorkerAvailable("no gateway reachable through the bootstrap nodes",
                                    data={"retry_after": 2.0})
        return gateways

    async def peers(self) -> list[dict[str, Any]]:
        """Every node the client can see (for a non-member: the bootstrap
        nodes, gateways and web nodes), as ``{peer_id, roles, addrs, version,
        models, info}`` dicts.

        Raises:
            ConfigError: in HTTP mode (listing peers needs peer-to-peer access).
        """
        if self.is_http:
            raise ConfigError("listing peers needs peer-to-peer access (bootstrap=...)")
        seen: dict[str, Descriptor] = dict(await self._entry_points())
        for role in ROLES:
            for desc in await self.find(role):
                seen.setdefault(desc.peer_id, desc)
        return [{"peer_id": d.peer_id, "roles": list(d.roles), "addrs": list(d.addrs),
                 "version": d.version, "models": d.models(), "info": d.info}
                for d in sorted(seen.values(), key=lambda d: d.peer_id)]

    def _remember(self, desc: Descriptor) -> None:
        from libp2p.peer.id import ID

        from .rpc.host import parse_multiaddr

        try:
            addrs = [parse_multiaddr(a).decapsulate(parse_multiaddr(f"/p2p/{desc.peer_id}"))
                     for a in desc.addrs]
            self._host.get_peerstore().add_addrs(ID.from_base58(desc.peer_id), addrs, 600)
        except Exception:  # an address we cannot parse is simply not dialled
            return

    def _forget(self) -> None:
        self._found.clear()

    async def _call_role(self, role: str, method: str, params: Any) -> Any:
        """Call ``method`` on a node with ``role``, failing over between them."""
        nodes = [d.peer_id for d in await self.find(role)]
        if not nodes:
            if role == "gateway":
                await self.gateways()  # raises NoWorkerAvailable
            raise PeerUnavailable(
                f"no {role} node is reachable through the bootstrap nodes; bootstrap to a "
                f"node with the {role} role, or use a web node's URL (base_url=)")
        random.shuffle(nodes)
        last: P2PInferError | None = None
        for peer in nodes:
            try:
                return await self._rpc.call(peer, method, params)
            except (PeerUnavailable, StreamBroken) as exc:
                last = exc
                self._forget()
        assert last is not None
        raise last

    # -- HTTP helpers ------------------------------------------------------------------------
    def _http_headers(self, *, required: bool = True) -> dict[str, str]:
        if self.token:
            return {"Authorization": f"Bearer {self.token}"}
        if self.api_key:
            return {"X-API-Key": self.api_key}
        if not required:
            return {}
        raise AuthenticationRequired("no API key (pass api_key= or set P2PINFER_API_KEY)")

    async def _http_json(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                         body: dict[str, Any] | None = None,
                         params: dict[str, str] | None = None) -> Any:
        from ._http import request_json

        assert self._http is not None
        return await request_json(self._http, method, path, headers=headers or {}, body=body,
                                  params=params)

    # -- inference ----------------------------------------------------------------------------
    async def inference(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        system: str | None = None,
        format: str | dict[str, Any] | None = None,
        raw: bool = False,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | None = None,
        parallel_tool_calls: bool | None = None,
        logprobs: bool = False,
        top_logprobs: int | None = None,
    ) -> InferenceResponse:
        """Ask for a whole answer (the ``inference`` call of the RPC API).

        The worker sends it as one frame once it is complete (``"stream":
        false``), so a worker that fails part way through is replaced by
        another before anything reaches you. ``format``: ``"json"`` (any
        JSON object) or a JSON schema the answer must match (read it with
        :meth:`InferenceResponse.json`); a model that cannot constrain its
        answer raises :class:`~p2pinfer.errors.MissingCapability`. ``raw``:
        continue ``prompt`` as it is, without the model's chat template.

        ``tools``: functions the model may call ({name, description,
        parameters} or OpenAI's {type: function, function: {...}});
        ``tool_choice``: ``"auto"``, ``"none"``, ``"required"`` or a tool's
        name. The calls come back in :attr:`InferenceResponse.tool_calls`;
        :meth:`InferenceResponse.message` is the history entry to send back
        with the results. ``logprobs``: each token's log probability (and
        ``top_logprobs`` alternatives, up to 20) in
        :attr:`InferenceResponse.logprobs`."""
        request = _request(prompt, messages, {
            "model": model, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p, "stop": stop, "seed": seed, "system": system, "stream": False,
            "format": _format(format), "raw": raw or None, "tools": _tools(tools),
            "tool_choice": _tool_choice(tool_choice),
            "parallel_tool_calls": parallel_tool_calls, "logprobs": logprobs or None,
            "top_logprobs": top_logprobs})
        async with InferenceStream(self, request) as stream:
            async for _ in stream:
                pass
        if stream.response is None:  # pragma: no cover - a finished stream sets it
            raise StreamBroken("the answer ended without its final frame")
        return stream.response

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        system: str | None = None,
        format: str | dict[str, Any] | None = None,
        raw: bool = False,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | None = None,
        parallel_tool_calls: bool | None = None,
        logprobs: bool = False,
        top_logprobs: int | None = None,
    ) -> InferenceStream:
        """An answer as it is generated: ``async with client.stream(...) as s``
        (``format``, ``raw`` and tools as for :meth:`inference`; tool calls
        are in ``s.response`` once the stream is done)."""
        request = _request(prompt, messages, {
            "model": model, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p, "stop": stop, "seed": seed, "system": system,
            "format": _format(format), "raw": raw or None, "tools": _tools(tools),
            "tool_choice": _tool_choice(tool_choice),
            "parallel_tool_calls": parallel_tool_calls, "logprobs": logprobs or None,
            "top_logprobs": top_logprobs})
        return InferenceStream(self, request)

    async def _open_stream(self, request: dict[str, Any]) -> tuple[Any, Any]:
        self._need_open()
        if self._http is not None:
            from ._http import HttpStream

            return None, await HttpStream.open(self._http, request, self._http_headers())
        auth = self.auth
        gateways = list(await self.gateways())
        random.shuffle(gateways)
        last: P2PInferError | None = None
        for peer in gateways:
            stream = self._rpc.stream(peer, "processInferenceRequest",
                                      {"request": request, "auth": auth})
            try:
                await stream.__aenter__()
                return stream, None
            except (PeerUnavailable, StreamBroken) as exc:
                last = exc
                self._forget()
        assert last is not None
        raise last

    # -- gateway views ----------------------------------------------------------------------------
    async def embed(self, input: str | list[str], *, model: str | None = None
                    ) -> EmbeddingResponse:
        """Vectors for ``input`` (a text or up to 256), from an embedding
        model (``model``; default: the gateway's ``default_embedding_model``,
        ``all-minilm`` with its 384 dimensions). The vectors are unit
        length: their dot product is the texts' cosine similarity.

        Raises:
            MissingCapability: ``model`` does not embed (a chat model).
        """
        self._need_open()
        request: dict[str, Any] = {"input": input}
        if model is not None:
            request["model"] = model
        if self._http is not None:
            data = await self._http_json("POST", "/v1/embeddings", body=request,
                                         headers=self._http_headers())
            return EmbeddingResponse(
                vectors=[item["embedding"] for item in data["data"]], model=data.get("model"),
                usage=dict(data.get("usage") or {}),
                request_id=data.get("request_id"))
        data = await self._call_role("gateway", "processEmbeddingRequest",
                                     {"request": request, "auth": self.auth})
        return EmbeddingResponse(vectors=list(data["embeddings"]), model=data.get("model"),
                                 usage=dict(data.get("usage") or {}),
                                 request_id=data.get("request_id"), worker=data.get("worker"))

    async def models(self) -> list[dict[str, Any]]:
        """Models served in the swarm: ``{name, aliases, backend, workers,
        free_slots, queue_depth, status, context_length}`` each."""
        self._need_open()
        if self._http is not None:
            data = await self._http_json("GET", "/api/models", headers=self._http_headers())
        else:
            data = await self._call_role("gateway", "listModels", {"auth": self.auth})
        return list(data["models"])

    async def wait_for_model(self, name: str | None = None, *, workers: int = 1
                             ) -> dict[str, Any]:
        """Until ``workers`` workers serve model ``name`` (any model if None)
        loaded; returns its :meth:`models` entry. Workers announce themselves
        on the DHT every few seconds, so this polls; bound it with
        ``trio.fail_after``.

        Raises:
            InvalidParams: ``workers`` is not an integer >= 1.
        """
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise InvalidParams("workers: must be an integer >= 1", data={"field": "workers"})
        while True:
            try:
                for entry in await self.models():
                    if (name in (None, entry["name"]) and entry.get("status") == "loaded"
                            and int(entry.get("workers") or 0) >= workers):
                        return entry
            except (NoWorkerAvailable, PeerUnavailable):
                pass  # the gateway itself is still starting
            await trio.sleep(0.2)

    async def quota(self) -> dict[str, Any]:
        """Requests and tokens used in the current window, and the limits."""
        self._need_open()
        if self._http is not None:
            return dict(await self._http_json("GET", "/api/quota",
                                              headers=self._http_headers()))
        return dict(await self._call_role("gateway", "getUserQuota", {"auth": self.auth}))

    async def usage(self, *, since: str | None = None, until: str | None = None
                    ) -> list[dict[str, Any]]:
        """Usage per day and key, ``{date, api_key_id, requests, tokens}``
        each (``since``/``until``: ``YYYY-MM-DD``, inclusive)."""
        self._need_open()
        query = {k: v for k, v in (("since", since), ("until", until)) if v}
        if self._http is not None:
            data = await self._http_json("GET", "/api/usage", headers=self._http_headers(),
                                         params=query)
        else:
            data = await self._call_role("gateway", "getUsage", {"auth": self.auth, **query})
        return list(data["usage"])

    async def health(self) -> dict[str, Any]:
        """A gateway's view of the swarm (workers, models, ledger, quota)."""
        self._need_open()
        if self._http is not None:
            return dict(await self._http_json("GET", "/api/health"))
        return dict(await self._call_role("gateway", "getServiceHealth", {}))

    async def system_health(self) -> dict[str, Any]:
        """The metrics role's view: every node's status and firing alerts
        (redacted for non-members).

        Raises:
            PeerUnavailable: no metrics node is reachable.
            UnknownMethod: in HTTP mode (the REST API has no such route).
        """
        self._need_open()
        if self._http is not None:
            raise UnknownMethod("the HTTP API serves the gateway's health only (health())")
        return dict(await self._call_role("metrics", "getSystemHealth", None))

    # -- accounts ---------------------------------------------------------------------------------
    async def register(self, username: str, email: str, password: str) -> dict[str, Any]:
        """Create an account; returns the user (``user_id``, ``username``, ...)."""
        self._need_open()
        body = {"username": username, "email": email, "password": password}
        if self._http is not None:
            return dict(await self._http_json("POST", "/api/auth/register", body=body))
        return dict(await self._call_role("auth", "registerUser", body))

    async def login(self, username: str | None = None, *, password: str,
                    email: str | None = None) -> dict[str, Any]:
        """Log in with a username (or email) and password. Returns the session
        (``token``, ``refresh_token``, ``expires_at``, ``user``, ...); the client
        uses its token from then on."""
        self._need_open()
        if (username is None) == (email is None):
            raise InvalidParams("give a username or an email", data={"field": "username"})
        body: dict[str, Any] = {"password": password}
        body["username" if username is not None else "email"] = username or email
        if self._http is not None:
            session = dict(await self._http_json("POST", "/api/auth/login", body=body))
        else:
            session = dict(await self._call_role("auth", "loginUser", body))
        self.token = str(session["token"])
        return session

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        """Trade a refresh token for a new session (the old one is spent)."""
        self._need_open()
        body = {"refresh_token": refresh_token}
        if self._http is not None:
            session = dict(await self._http_json("POST", "/api/auth/refresh", body=body))
        else:
            session = dict(await self._call_role("auth", "refreshToken", body))
        self.token = str(session["token"])
        return session

    async def logout(self, *, refresh_token: str | None = None) -> dict[str, Any]:
        """End the session of this client's token (or of ``refresh_token``)
        on every node."""
        self._need_open()
        if refresh_token is None and not self.token:
            raise AuthenticationRequired("no session to end (log in first)")
        if self._http is not None:
            if refresh_token is not None:
                result = await self._http_json("POST", "/api/auth/logout",
                                               body={"refresh_token": refresh_token})
            else:
                result = await self._http_json("POST", "/api/auth/logout",
                                               headers=self._http_headers())
        else:
            params = ({"refresh_token": refresh_token} if refresh_token is not None
                      else {"token": self.token})
            result = await self._call_role("auth", "logoutUser", params)
        if refresh_token is None:
            self.token = None
        return dict(result)

    async def logout_everywhere(self) -> dict[str, Any]:
        """End every session of the caller's account on every node (this
        client's too): ``{user_id, sessions_ended_at}``. API keys stay valid."""
        self._need_open()
        if not self.token:
            raise AuthenticationRequired("ending your sessions needs a session: log in first")
        if self._http is not None:
            result = await self._http_json("POST", "/api/auth/logout-all",
                                           headers=self._http_headers())
        else:
            result = await self._call_role("auth", "logoutEverywhere", {"token": self.token})
        self.token = None
        return dict(result)

    async def change_password(self, current_password: str,
                              new_password: str) -> dict[str, Any]:
        """Change the caller's password (needs a session token). Every session
        of the account ends, on every node, once the change has replicated;
        returns the new session, which this client uses from then on. API
        keys stay valid (revoke them to end them)."""
        self._need_open()
        if not self.token:
            raise AuthenticationRequired("changing the password needs a session: log in first")
        body = {"current_password": current_password, "new_password": new_password}
        if self._http is not None:
            session = dict(await self._http_json("POST", "/api/auth/password",
                                                 headers=self._http_headers(), body=body))
        else:
            session = dict(await self._call_role("auth", "changePassword",
                                                 {"token": self.token, **body}))
        self.token = str(session["token"])
        return session

    async def me(self) -> dict[str, Any]:
        """The caller's account: ``user_id``, ``username``, ``email``, ``tier``, ..."""
        self._need_open()
        if self._http is not None:
            return dict(await self._http_json("GET", "/api/auth/me",
                                              headers=self._http_headers()))
        return dict(await self._call_role("auth", "getUser", self.auth))

    async def create_api_key(self, name: str | None = None) -> dict[str, Any]:
        """Issue an API key (needs a session token): ``{api_key, key_id,
        public_id, name, created_at, user_id}``; the key is shown only here."""
        self._need_open()
        if not self.token:
            raise AuthenticationRequired("creating an API key needs a session: log in first")
        if self._http is not None:
            return dict(await self._http_json("POST", "/api/auth/api-keys",
                                              headers=self._http_headers(),
                                              body={"name": name} if name else {}))
        params: dict[str, Any] = {"token": self.token}
        if name:
            params["name"] = name
        return dict(await self._call_role("auth", "generateApiKey", params))

    async def api_keys(self) -> list[dict[str, Any]]:
        """The caller's API keys (revoked ones too), never the secrets."""
        self._need_open()
        if self._http is not None:
            data = await self._http_json("GET", "/api/auth/api-keys",
                                         headers=self._http_headers())
        else:
            data = await self._call_role("auth", "listApiKeys", self.auth)
        return list(data["keys"])

    async def revoke_api_key(self, key_id: str) -> dict[str, Any]:
        """Revoke one of the caller's keys (needs a session token)."""
        self._need_open()
        if not self.token:
            raise AuthenticationRequired("revoking an API key needs a session: log in first")
        if self._http is not None:
            return dict(await self._http_json("DELETE", f"/api/auth/api-keys/{key_id}",
                                              headers=self._http_headers()))
        return dict(await self._call_role("auth", "revokeApiKey",
                                          {"token": self.token, "key_id": key_id}))

    async def export_data(self, *, user_id: str | None = None) -> dict[str, Any]:
        """Everything the swarm holds about the caller (needs a session
        token): ``account``, ``api_keys`` (metadata only), ``usage``,
        ``request_logs`` (prompt hashes only), ``audit``. Admins may name
        another ``user_id``."""
        self._need_open()
        if not self.token:
            raise AuthenticationRequired("exporting your data needs a session: log in first")
        if self._http is not None:
            return dict(await self._http_json(
                "GET", "/api/auth/export", headers=self._http_headers(),
                params={"user_id": user_id} if user_id else None))
        params: dict[str, Any] = {"token": self.token}
        if user_id:
            params["user_id"] = user_id
        return dict(await self._call_role("auth", "exportUserData", params))

    async def erase_account(self, password: str | None = None, *,
                            user_id: str | None = None) -> dict[str, Any]:
        """Erase the caller's account on every node (needs a session token and
        the ``password``), or, for an admin, ``user_id``'s. Usage totals stay;
        username and email are gone everywhere. Returns ``{user_id,
        erased_at, revoked_keys, redacted, already_erased}``."""
        self._need_open()
        if not self.token:
            raise AuthenticationRequired("erasing an account needs a session: log in first")
        if user_id is None and password is None:
            raise InvalidParams("password: erasing your own account needs your password",
                                data={"field": "password"})
        if self._http is not None:
            if user_id is not None:
                return dict(await self._http_json("DELETE", f"/api/auth/users/{user_id}",
                                                  headers=self._http_headers()))
            return dict(await self._http_json("DELETE", "/api/auth/me",
                                              headers=self._http_headers(),
                                              body={"password": password}))
        params: dict[str, Any] = {"token": self.token}
        if user_id is not None:
            params["user_id"] = user_id
        if password is not None:
            params["password"] = password
        result = dict(await self._call_role("auth", "eraseUser", params))
        return result


# SyncClient lives in its own module; re-exported here (public API).
from .sync_client import SyncClient, SyncStream  # noqa: E402
