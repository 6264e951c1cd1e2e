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

Each way in is a :class:`~p2pinfer.transports.Transport`
(:class:`~p2pinfer.transports.libp2p.Libp2pTransport`,
:class:`~p2pinfer.transports.http.HttpTransport`): the client turns each of
its methods into one operation of the transport and builds its answers
(:class:`InferenceResponse`, :class:`EmbeddingResponse`) from the results.
``Client(transport=...)`` also takes a transport of your own.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from .errors import (
    AuthenticationRequired,
    ConfigError,
    InvalidParams,
    NoWorkerAvailable,
    PeerUnavailable,
    StreamBroken,
)
from .identity import Identity
from .prompts import ToolCall, parse_tool_calls
from .transports import AnswerStream, Credential, Transport
from .transports.libp2p import Libp2pTransport

if TYPE_CHECKING:  # pragma: no cover
    import httpx

    from .discovery import Descriptor
    from .sync_client import SyncClient as SyncClient
    from .sync_client import SyncStream as SyncStream

__all__ = ["Client", "EmbeddingResponse", "InferenceResponse", "InferenceStream", "SyncClient",
           "SyncStream"]


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


class InferenceStream:
    """Text deltas of one answer as they arrive; :attr:`response` once done."""

    def __init__(self, client: Client, request: dict[str, Any]) -> None:
        self._client = client
        self._request = request
        self._answer: AnswerStream | None = None
        self._parts: list[str] = []
        self._logprobs: list[dict[str, Any]] = []
        self.response: InferenceResponse | None = None

    async def __aenter__(self) -> InferenceStream:
        self._answer = await self._client._open_answer(self._request)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._answer is not None:
            await self._answer.aclose()

    def __aiter__(self) -> InferenceStream:
        return self

    async def __anext__(self) -> str:
        if self._answer is None:
            raise RuntimeError("use the stream as `async with client.stream(...) as s`")
        try:
            chunk = await self._answer.__anext__()
        except StopAsyncIteration:
            self.response = InferenceResponse.from_trailer(
                "".join(self._parts), self._answer.trailer, logprobs=self._logprobs)
            raise
        if isinstance(chunk.get("logprobs"), list):
            self._logprobs.extend(chunk["logprobs"])
        text = str(chunk.get("delta", ""))
        self._parts.append(text)
        return text


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
            ``httpx.MockTransport``), or a
            :class:`~p2pinfer.transports.Transport` of your own to reach the
            swarm through (then no address is needed).
        network: the network id the swarm must belong to (default:
            ``P2PINFER_NETWORK``, else the bootstrap node's).

    Raises:
        ConfigError: neither bootstrap addresses nor a base URL (nor a transport).
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
        transport: httpx.AsyncBaseTransport | Transport | None = None,
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
        self._network = network or os.environ.get("P2PINFER_NETWORK") or None
        self._untrusted: dict[str, str] = {}
        self._opened = False
        self._transport: Transport
        if isinstance(transport, Transport):
            from .transports.http import HttpTransport

            self._transport = transport
            self._is_http = isinstance(transport, HttpTransport)
        elif not self.bootstrap and not self.base_url:
            raise ConfigError("a client needs bootstrap addresses or a base_url "
                              "(or P2PINFER_BOOTSTRAP / P2PINFER_URL)")
        elif self.bootstrap:
            self._transport = Libp2pTransport(self.bootstrap, identity=self.identity,
                                              network=self._network)
            self._is_http = False
        else:
            from .transports.http import HttpTransport

            assert self.base_url is not None
            self._transport = HttpTransport(self.base_url, verify=self.verify,
                                            transport=transport)
            self._is_http = True

    @property
    def auth(self) -> dict[str, str]:
        """The credential sent with each request (``{"token"}`` or ``{"api_key"}``)."""
        return self._credential().rpc()

    def _credential(self) -> Credential:
        if self.token:
            return Credential.session(self.token)
        if self.api_key:
            return Credential.key(self.api_key)
        raise AuthenticationRequired("no API key (pass api_key= or set P2PINFER_API_KEY)")

    def _session(self, needed_for: str) -> Credential:
        """The session token, for a call that takes no API key."""
        if not self.token:
            raise AuthenticationRequired(f"{needed_for} needs a session: log in first")
        return Credential.session(self.token)

    @property
    def is_http(self) -> bool:
        """True when this client talks HTTP to a web node."""
        return self._is_http

    @property
    def network(self) -> str | None:
        """The network id the swarm must belong to: ``network=`` (or
        ``P2PINFER_NETWORK``), else the first bootstrap node's once it has
        proved it is a member."""
        p2p = self._p2p
        return p2p.network if p2p is not None else self._network

    @network.setter
    def network(self, value: str | None) -> None:
        self._network = value
        if self._p2p is not None:
            self._p2p.network = value

    @property
    def untrusted(self) -> dict[str, str]:
        """Nodes not used because they showed no valid certificate, by peer id."""
        p2p = self._p2p
        return p2p.untrusted if p2p is not None else self._untrusted

    @property
    def _p2p(self) -> Libp2pTransport | None:
        transport = self._transport
        return transport if isinstance(transport, Libp2pTransport) else None

    @property
    def _rpc(self) -> Any:
        """The peer-to-peer transport's RPC client (None over HTTP or when closed)."""
        p2p = self._p2p
        return p2p.rpc if p2p is not None else None

    def _libp2p(self, what: str) -> Libp2pTransport:
        p2p = self._p2p
        if p2p is None:
            raise ConfigError(f"{what} needs peer-to-peer access (bootstrap=...)")
        return p2p

    # -- lifecycle -------------------------------------------------------------------
    async def __aenter__(self) -> Client:
        await self._transport.__aenter__()
        self._opened = True
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        self._opened = False
        return await self._transport.__aexit__(*exc)

    def _need_open(self) -> None:
        if not self._opened:
            raise RuntimeError("use the client as `async with Client(...) as client`")

    # -- finding nodes ---------------------------------------------------------------------
    async def _entry_points(self) -> dict[str, Descriptor]:
        """Dial every bootstrap node (once) and read its descriptor."""
        return await self._libp2p("finding nodes").entry_points()

    async def find(self, role: str) -> list[Descriptor]:
        """Descriptors of nodes with ``role`` that the bootstrap nodes know.

        A non-member client may look up only entry points (gateway and web
        nodes); other roles are found only among the bootstrap nodes
        themselves. Results are reused for 30 s.

        Raises:
            ConfigError: in HTTP mode (finding nodes needs peer-to-peer access).
        """
        return await self._libp2p("finding nodes").find(role)

    async def gateways(self) -> list[str]:
        """Peer ids of reachable gateways (refreshed every 30 s).

        Raises:
            ConfigError: in HTTP mode (finding nodes needs peer-to-peer access).
        """
        return await self._libp2p("finding gateways").gateways()

    async def peers(self) -> list[dict[str, Any]]:
        """Every node the client can see (for a non-member: the bootstrap
        nodes, gateways and web nodes), as ``{peer_id, roles, addrs, version,
        models, info}`` dicts.

        Raises:
            ConfigError: in HTTP mode (listing peers needs peer-to-peer access).
        """
        return await self._transport.peers()

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

    async def _open_answer(self, request: dict[str, Any]) -> AnswerStream:
        self._need_open()
        return await self._transport.open_answer(request, self._credential())

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
        data = await self._transport.call("embed", request, self._credential())
        return EmbeddingResponse(vectors=list(data["embeddings"]), model=data.get("model"),
                                 usage=dict(data.get("usage") or {}),
                                 request_id=data.get("request_id"), worker=data.get("worker"))

    async def models(self) -> list[dict[str, Any]]:
        """Models served in the swarm: ``{name, aliases, backend, workers,
        free_slots, queue_depth, status, context_length}`` each."""
        self._need_open()
        data = await self._transport.call("models", {}, self._credential())
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
        return dict(await self._transport.call("quota", {}, self._credential()))

    async def usage(self, *, since: str | None = None, until: str | None = None
                    ) -> list[dict[str, Any]]:
        """Usage per day and key, ``{date, api_key_id, requests, tokens}``
        each (``since``/``until``: ``YYYY-MM-DD``, inclusive)."""
        self._need_open()
        query = {k: v for k, v in (("since", since), ("until", until)) if v}
        data = await self._transport.call("usage", query, self._credential())
        return list(data["usage"])

    async def health(self) -> dict[str, Any]:
        """A gateway's view of the swarm (workers, models, ledger, quota)."""
        self._need_open()
        return dict(await self._transport.call("health", {}, None))

    async def system_health(self) -> dict[str, Any]:
        """The metrics role's view: every node's status and firing alerts
        (redacted for non-members).

        Raises:
            PeerUnavailable: no metrics node is reachable.
            UnknownMethod: in HTTP mode (the REST API has no such route).
        """
        self._need_open()
        return dict(await self._transport.call("system_health", {}, None))

    # -- accounts ---------------------------------------------------------------------------------
    async def register(self, username: str, email: str, password: str) -> dict[str, Any]:
        """Create an account; returns the user (``user_id``, ``username``, ...)."""
        self._need_open()
        body = {"username": username, "email": email, "password": password}
        return dict(await self._transport.call("register", body, None))

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
        session = dict(await self._transport.call("login", body, None))
        self.token = str(session["token"])
        return session

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        """Trade a refresh token for a new session (the old one is spent)."""
        self._need_open()
        body = {"refresh_token": refresh_token}
        session = dict(await self._transport.call("refresh", body, None))
        self.token = str(session["token"])
        return session

    async def logout(self, *, refresh_token: str | None = None) -> dict[str, Any]:
        """End the session of this client's token (or of ``refresh_token``)
        on every node."""
        self._need_open()
        if refresh_token is None and not self.token:
            raise AuthenticationRequired("no session to end (log in first)")
        if refresh_token is not None:
            result = await self._transport.call("logout", {"refresh_token": refresh_token},
                                                None)
        else:
            result = await self._transport.call("logout", {}, self._session("logging out"))
        if refresh_token is None:
            self.token = None
        return dict(result)

    async def logout_everywhere(self) -> dict[str, Any]:
        """End every session of the caller's account on every node (this
        client's too): ``{user_id, sessions_ended_at}``. API keys stay valid."""
        self._need_open()
        session = self._session("ending your sessions")
        result = await self._transport.call("logout_everywhere", {}, session)
        self.token = None
        return dict(result)

    async def change_password(self, current_password: str,
                              new_password: str) -> dict[str, Any]:
        """Change the caller's password (needs a session token). Every session
        of the account ends, on every node, once the change has replicated;
        returns the new session, which this client uses from then on. API
        keys stay valid (revoke them to end them)."""
        self._need_open()
        credential = self._session("changing the password")
        body = {"current_password": current_password, "new_password": new_password}
        session = dict(await self._transport.call("change_password", body, credential))
        self.token = str(session["token"])
        return session

    async def me(self) -> dict[str, Any]:
        """The caller's account: ``user_id``, ``username``, ``email``, ``tier``, ..."""
        self._need_open()
        return dict(await self._transport.call("me", {}, self._credential()))

    async def create_api_key(self, name: str | None = None) -> dict[str, Any]:
        """Issue an API key (needs a session token): ``{api_key, key_id,
        public_id, name, created_at, user_id}``; the key is shown only here."""
        self._need_open()
        credential = self._session("creating an API key")
        params: dict[str, Any] = {"name": name} if name else {}
        return dict(await self._transport.call("create_api_key", params, credential))

    async def api_keys(self) -> list[dict[str, Any]]:
        """The caller's API keys (revoked ones too), never the secrets."""
        self._need_open()
        data = await self._transport.call("api_keys", {}, self._credential())
        return list(data["keys"])

    async def revoke_api_key(self, key_id: str) -> dict[str, Any]:
        """Revoke one of the caller's keys (needs a session token)."""
        self._need_open()
        credential = self._session("revoking an API key")
        return dict(await self._transport.call("revoke_api_key", {"key_id": key_id},
                                               credential))

    async def export_data(self, *, user_id: str | None = None) -> dict[str, Any]:
        """Everything the swarm holds about the caller (needs a session
        token): ``account``, ``api_keys`` (metadata only), ``usage``,
        ``request_logs`` (prompt hashes only), ``audit``. Admins may name
        another ``user_id``."""
        self._need_open()
        credential = self._session("exporting your data")
        params: dict[str, Any] = {"user_id": user_id} if user_id else {}
        return dict(await self._transport.call("export_data", params, credential))

    async def erase_account(self, password: str | None = None, *,
                            user_id: str | None = None) -> dict[str, Any]:
        """Erase the caller's account on every node (needs a session token and
        the ``password``), or, for an admin, ``user_id``'s. Usage totals stay;
        username and email are gone everywhere. Returns ``{user_id,
        erased_at, revoked_keys, redacted, already_erased}``."""
        self._need_open()
        credential = self._session("erasing an account")
        if user_id is None and password is None:
            raise InvalidParams("password: erasing your own account needs your password",
                                data={"field": "password"})
        params: dict[str, Any] = {}
        if user_id is not None:
            params["user_id"] = user_id
        if password is not None:
            params["password"] = password
        return dict(await self._transport.call("erase_account", params, credential))


def __getattr__(name: str) -> Any:
    """:class:`SyncClient` and :class:`SyncStream`, which live in
    :mod:`p2pinfer.sync_client` (built on this module), imported on first use."""
    if name in ("SyncClient", "SyncStream"):
        from . import sync_client

        value = getattr(sync_client, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
