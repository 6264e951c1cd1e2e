"""How the web role reaches the swarm: auth, gateway and metrics nodes.

Every operation is an RPC call, also when this node holds the role itself
(a node calling its own peer id is served in-process), so the web role
behaves the same on an all-in-one node and on a web-only node:

- :meth:`Upstream.call` finds the nodes of a role (this node first, then
  members found through discovery), calls the first and fails over to the
  next one only when a node cannot be reached;
- :meth:`Upstream.inference` opens ``processInferenceRequest`` on a
  gateway and waits for its first event, so every error the gateway raises
  before answering (credentials, limits, no worker) is known before an
  HTTP status has been sent (:class:`InferenceCall`);
- :class:`ModelCatalog`: the swarm's models (``listModels``), reused for
  ``[web] models_ttl`` seconds, to tell an unknown model (404) from a busy
  swarm;
- what the pages read of this node's ledger (:meth:`Upstream.session`,
  :meth:`Upstream.account`, :meth:`Upstream.members`), as plain data.

:class:`WebUpstream` is all the web app uses of it: the routes, pages and
sessions never touch the node, so the same app can serve from any process
that implements it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import trio

from ..errors import (
    DeadlineExceeded,
    MalformedFrame,
    NoWorkerAvailable,
    P2PInferError,
    PeerUnavailable,
    UnknownModel,
    UnknownUser,
)
from .inputs import current_source

if TYPE_CHECKING:  # pragma: no cover
    from ..context import RoleContext
    from ..credentials import Principal

__all__ = ["InferenceCall", "ModelCatalog", "Upstream", "WebUpstream", "model_names"]

log = logging.getLogger(__name__)

_END = object()
# A model list younger than this is not asked for again on a miss.
FRESH_ENOUGH = 0.5
# A session made by a login on another auth node, or a user just
# registered there, gets longer: a page load waits for it rather than
# sending the user back to the login form.
SESSION_WAIT = 3.0


class InferenceCall:
    """One streamed ``processInferenceRequest`` (see the module docstring).

    Iterate for text deltas; :attr:`trailer` holds the gateway's trailer
    (``model``, ``finish_reason``, ``usage``, ``worker``, ``request_id``,
    ``latency_ms``, ``ttft_ms``) once the stream is exhausted. Always
    :meth:`aclose` it (it cancels the call on the gateway if unfinished).
    """

    def __init__(self, stream: Any, first: Any, gateway: str) -> None:
        self._stream = stream
        self._first = first
        self._closed = False
        self.gateway = gateway
        self.trailer: dict[str, Any] = dict(stream.trailer or {}) if first is _END else {}
        #: the log probabilities of the last chunk's tokens (None: not asked),
        #: and of every token so far
        self.chunk_logprobs: list[dict[str, Any]] | None = None
        self.logprobs: list[dict[str, Any]] = []

    def __aiter__(self) -> InferenceCall:
        return self

    async def __anext__(self) -> str:
        if self._first is not None:
            first, self._first = self._first, None
            if first is _END:
                raise StopAsyncIteration
            return self._take(first)
        try:
            chunk = await self._stream.__anext__()
        except StopAsyncIteration:
            self.trailer = dict(self._stream.trailer or {})
            raise
        return self._take(chunk)

    def _take(self, chunk: Any) -> str:
        scores = chunk.get("logprobs") if isinstance(chunk, dict) else None
        self.chunk_logprobs = scores if isinstance(scores, list) and scores else None
        if self.chunk_logprobs:
            self.logprobs.extend(self.chunk_logprobs)
        return _delta(chunk)

    async def raw_chunks(self) -> AsyncIterator[Any]:
        """The gateway's chunks as they come (to relay them whole); the
        :attr:`trailer` is set once they are exhausted. Use this or iterate
        the call, not both."""
        if self._first is not None:
            first, self._first = self._first, None
            if first is _END:
                return
            yield first
        while True:
            try:
                chunk = await self._stream.__anext__()
            except StopAsyncIteration:
                self.trailer = dict(self._stream.trailer or {})
                return
            yield chunk

    async def collect(self) -> str:
        """The whole answer (then :attr:`trailer` is set)."""
        return "".join([piece async for piece in self])

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self._stream.__aexit__(None, None, None)


def _delta(chunk: Any) -> str:
    if isinstance(chunk, dict):
        return str(chunk.get("delta", ""))
    return str(chunk)


def model_names(models: list[dict[str, Any]]) -> dict[str, str]:
    """Every name and alias of ``models`` → the model's name."""
    out: dict[str, str] = {}
    for m in models:
        name = str(m.get("name"))
        out.setdefault(name, name)
        for alias in m.get("aliases") or []:
            out.setdefault(str(alias), name)
    return out


class WebUpstream(Protocol):
    """What the web app (routes, pages, sessions) uses of the swarm and of
    its node. Every method may raise the swarm's errors
    (:class:`~p2pinfer.errors.P2PInferError`)."""

    catalog: ModelCatalog

    async def authenticate(self, auth: dict[str, str]) -> Principal:
        """The principal of an API key or session token (offline, on the
        node's ledger; a credential made a moment ago gets a second)."""

    async def session(self, token: str) -> Principal:
        """The principal of a session token (TokenExpired once it expired)."""

    async def wait_for_user(self, user_id: str) -> None:
        """Until the node's ledger knows ``user_id`` (at most a second)."""

    async def peers(self, role: str) -> list[str]:
        """Member nodes with ``role``, the node itself first."""

    async def call(self, role: str, method: str, params: Any = None, *,
                   long: bool = False) -> Any:
        """``method`` on a node with ``role``, failing over between them."""

    async def embed(self, request: dict[str, Any], auth: dict[str, str]) -> dict[str, Any]:
        """``processEmbeddingRequest`` for the HTTP client."""

    async def inference(self, request: dict[str, Any], auth: dict[str, str], *,
                        stream: bool = True) -> InferenceCall:
        """``processInferenceRequest``, opened, its first event awaited."""

    async def account(self, user_id: str, *, since: str, logs: int) -> dict[str, Any]:
        """A user's keys, usage since ``since`` and last ``logs`` requests,
        from the node's ledger: ``{"keys", "usage", "logs"}``, rows as maps."""

    async def members(self) -> list[dict[str, Any]]:
        """The network's members (``peer_id``, ``roles``, ``admitted_at``,
        ``expires_at``, ``removed_after``)."""


def _find(name: str, names: dict[str, str]) -> str | None:
    """``name`` or ``name`` without ``:latest``, whichever ``names`` has."""
    for candidate in (name, name.removesuffix(":latest")):
        if candidate in names:
            return candidate
    return None


@dataclass
class ModelCatalog:
    """The swarm's models as the gateway lists them, cached briefly."""

    upstream: WebUpstream
    ttl: float
    _models: list[dict[str, Any]] | None = None
    _at: float = -1e18

    async def models(self, auth: dict[str, str], *, fresh: bool = False) -> list[dict[str, Any]]:
        """``listModels`` (authenticated with ``auth``), cached for ``ttl``;
        ``auth`` is checked every time, cached or not."""
        await self.upstream.authenticate(auth)
        now = time.monotonic()
        if fresh or self._models is None or now - self._at > self.ttl:
            result = await self.upstream.call("gateway", "listModels", {"auth": auth})
            models = result.get("models") if isinstance(result, dict) else None
            self._models = [m for m in models or [] if isinstance(m, dict)]
            self._at = time.monotonic()
        return list(self._models)

    async def check_served(self, busy: NoWorkerAvailable, auth: dict[str, str]) -> None:
        """Raise UnknownModel (404) if the model a gateway found no worker
        for is served by no worker in the swarm at all (the gateway's
        default model, when the request names none); return if it is only
        busy."""
        model = busy.data.get("model")
        if isinstance(model, str) and model not in model_names(
                await self.models(auth, fresh=True)):
            raise UnknownModel(f"model {model[:128]!r} is not served by any worker in "
                               "the swarm", data={"model": model[:128]}) from busy

    async def resolve(self, name: str | None, auth: dict[str, str]) -> str | None:
        """The model's name for ``name`` (a name or an alias; ``x:latest``
        as ``x``), None for the gateway's default, or UnknownModel.

        A name found in the list cached within ``ttl`` is answered without
        checking ``auth``: the request goes on to the gateway, which checks
        it (with the same throttles), so the hot path costs no extra call.
        A name not found is looked up with ``auth`` checked first: a caller
        without a valid credential learns nothing about which models exist.
        """
        if name is None:
            return None
        if self._models is not None and time.monotonic() - self._at <= self.ttl:
            found = _find(name, model_names(self._models))
            if found is not None:
                return found
        for attempt in range(2):
            fresh = False
            if attempt:
                # Not in the list: ask again, but at most twice a second
                # (wait if it was just fetched: the model may have appeared
                # since, and another process's list may already have it),
                # unless another request fetched it while we waited. (Not
                # "is it 0.5 s old now": an event loop's timer may wake us a
                # fraction of a millisecond early, and the stale list would
                # then answer "no such model".)
                fetched_at = self._at
                age = time.monotonic() - fetched_at
                if age < FRESH_ENOUGH:
                    await anyio.sleep(FRESH_ENOUGH - age)
                fresh = self._at == fetched_at
            found = _find(name, model_names(await self.models(auth, fresh=fresh)))
            if found is not None:
                return found
        raise UnknownModel(f"model {name[:128]!r} is not served by any worker in the swarm",
                           data={"model": name[:128]})


class Upstream:
    """Calls to the swarm's auth, gateway and metrics nodes.

    Args:
        node: the node.
        call_timeout: seconds for a unary call.
        request_timeout: seconds an inference request may take.
        models_ttl: seconds the model list is reused.
    """

    def __init__(self, node: RoleContext, *, call_timeout: float, request_timeout: float,
                 models_ttl: float) -> None:
        self.node = node
        self.call_timeout = call_timeout
        self.request_timeout = request_timeout
        self.catalog = ModelCatalog(self, models_ttl)

    async def authenticate(self, auth: dict[str, str]) -> Principal:
        """The principal of ``auth``, checked offline on this node's ledger.

        A key or user this node does not know yet (an auth node elsewhere
        made it a moment ago) gets up to a second to replicate.

        Raises:
            AccessError: the credential's own error.
        """
        return await self.node.authenticator.authenticate_waiting(
            auth, source=current_source.get())

    async def session(self, token: str) -> Principal:
        """The principal of a session token, checked offline; a user this
        node does not know yet (a login on another auth node) gets up to a
        second to replicate.

        Raises:
            TokenExpired, UnknownUser, AccessError: the token's own error.
        """
        check = self.node.authenticator
        try:
            return check.verify_token(token)
        except UnknownUser:
            pass
        with trio.move_on_after(SESSION_WAIT):
            while True:
                await trio.sleep(0.05)
                try:
                    return check.verify_token(token)
                except UnknownUser:
                    continue
        return check.verify_token(token)

    async def wait_for_user(self, user_id: str) -> None:
        """Wait (briefly) until this node's ledger knows ``user_id``."""
        ledger = self.node.ledger
        with trio.move_on_after(SESSION_WAIT):
            await ledger.wait_until(lambda: ledger.user(user_id) is not None)

    async def account(self, user_id: str, *, since: str, logs: int) -> dict[str, Any]:
        """What the dashboard shows of ``user_id``, from this node's ledger
        (request logs also from the members that keep them)."""
        ledger = self.node.ledger
        return {
            "keys": [{"id": k.id, "name": k.name, "public_id": k.public_id,
                      "is_active": k.is_active, "revoked_at": k.revoked_at}
                     for k in ledger.api_keys_of(user_id)],
            "usage": [{"date": r.date, "api_key_id": r.api_key_id,
                       "request_count": r.request_count, "tokens_used": r.tokens_used}
                      for r in ledger.usage(user_id=user_id, since=since)],
            "logs": [{"created_at": r.created_at, "model_used": r.model_used,
                      "status": r.status, "tokens_used": r.tokens_used,
                      "response_time_ms": r.response_time_ms, "api_key_id": r.api_key_id}
                     for r in await ledger.gather_request_logs(user_id, limit=logs)],
        }

    async def members(self) -> list[dict[str, Any]]:
        """The network's members as this node's membership view has them."""
        return [{"peer_id": m.peer_id, "roles": sorted(m.roles), "admitted_at": m.admitted_at,
                 "expires_at": m.expires_at, "removed_after": m.removed_after}
                for m in self.node.ledger.members()]

    async def peers(self, role: str) -> list[str]:
        """Member nodes with ``role``: this node first if it has the role."""
        out: list[str] = [self.node.peer_id] if role in self.node.role_names else []
        try:
            found = await self.node.discovery.find_role(role)
        except P2PInferError as exc:
            log.debug("discovery of %s nodes failed: %s", role, exc)
            found = []
        for desc in found:
            if desc.peer_id not in out and self.node.is_member(desc.peer_id):
                out.append(desc.peer_id)
        return out

    async def _candidates(self, role: str) -> list[str]:
        if role in self.node.role_names:
            return [self.node.peer_id]  # others are looked up only if this one fails
        peers = await self.peers(role)
        if not peers:
            raise PeerUnavailable(f"no {role} node is reachable from this web node",
                                  data={"role": role, "retry_after": 2.0})
        return peers

    async def call(self, role: str, method: str, params: Any = None, *,
                   long: bool = False) -> Any:
        """Call ``method`` on a node with ``role`` (failing over on
        unreachable nodes only: any other error is the answer). A call to an
        auth node made for an HTTP client names that client (``source``), so
        the auth node throttles the client, not this web node. ``long``: the
        call may take as long as an inference request."""
        source = current_source.get()
        if role == "auth" and source and isinstance(params, dict) and "source" not in params:
            params = {**params, "source": source}
        candidates = await self._candidates(role)
        tried: list[str] = []
        last: P2PInferError | None = None
        while candidates:
            peer = candidates.pop(0)
            tried.append(peer)
            try:
                with trio.fail_after(self.request_timeout if long else self.call_timeout):
                    return await self.node.rpc.call(peer, method, params)
            except trio.TooSlowError:
                raise DeadlineExceeded(f"{method}: no answer from the {role} node in time",
                                       data={"retry_after": 1.0}) from None
            except PeerUnavailable as exc:
                last = exc
                if not candidates:
                    candidates = [p for p in await self.peers(role) if p not in tried]
        assert last is not None
        raise last

    async def embed(self, request: dict[str, Any], auth: dict[str, str]) -> dict[str, Any]:
        """``processEmbeddingRequest`` on a gateway, for the HTTP client
        (named as the source, so the gateway throttles it, not us); the
        model's alias resolved first (UnknownModel if the swarm lacks it)."""
        model = request.get("model")
        if isinstance(model, str):
            resolved = await self.catalog.resolve(model, auth)
            if resolved is not None:
                request = {**request, "model": resolved}
        params: dict[str, Any] = {"request": request, "auth": auth}
        source = current_source.get()
        if source is not None:
            params["source"] = source
        result = await self.call("gateway", "processEmbeddingRequest", params, long=True)
        if not isinstance(result, dict):
            raise MalformedFrame("the gateway's embeddings are not a map")
        return result

    async def inference(self, request: dict[str, Any], auth: dict[str, str], *,
                        stream: bool = True) -> InferenceCall:
        """Open ``processInferenceRequest`` and wait for its first event.

        ``stream=False`` asks for the whole answer as one chunk (see
        ``processPrompt``): fewer frames, and failover until it is complete.

        Raises:
            UnknownModel: the gateway found no worker for a model that no
                worker in the swarm serves at all (the gateway's default
                model, when the request names none): 404, not a busy swarm.
            P2PInferError: anything else the gateway raised before answering.
        """
        if not stream:
            request = {**request, "stream": False}
        try:
            return await self._open_inference(request, auth)
        except NoWorkerAvailable as exc:
            await self.catalog.check_served(exc, auth)
            raise

    async def _open_inference(self, request: dict[str, Any],
                              auth: dict[str, str]) -> InferenceCall:
        params: dict[str, Any] = {"request": request, "auth": auth}
        source = current_source.get()
        if source is not None:  # the gateway throttles the HTTP client, not us
            params["source"] = source
        candidates = await self._candidates("gateway")
        tried: list[str] = []
        last: P2PInferError | None = None
        while candidates:
            peer = candidates.pop(0)
            tried.append(peer)
            stream = self.node.rpc.stream(peer, "processInferenceRequest", params)
            entered = False
            try:
                with trio.fail_after(self.request_timeout):
                    # the deadline in force when the request is sent bounds the
                    # gateway's work; the rest of the stream is read outside
                    # this scope (by the HTTP response task)
                    await stream.__aenter__()
                    entered = True
                    try:
                        first = await stream.__anext__()
                    except StopAsyncIteration:
                        first = _END
            except BaseException as exc:
                with trio.CancelScope(shield=True):
                    if entered:
                        await stream.__aexit__(None, None, None)
                if isinstance(exc, trio.TooSlowError):
                    raise DeadlineExceeded("the gateway did not answer in time",
                                           data={"retry_after": 1.0}) from None
                if isinstance(exc, PeerUnavailable):
                    last = exc
                    if not candidates:
                        candidates = [p for p in await self.peers("gateway") if p not in tried]
                    continue
                raise
            return InferenceCall(stream, first, peer)
        assert last is not None
        raise last
