"""The gateway role: the inference request flow.

    client ──processInferenceRequest──▶ gateway
        1. authenticate (API key or session token) from the local ledger copy
           (a key or user not replicated here yet gets up to a second)
        2. ask the user's quota coordinator for a ticket (swarm-wide limits)
        3. pick a worker for the model (power of two choices), fail over
           before the first token
        4. stream the worker's tokens to the client
        5. return the ticket with the exact token count; record usage, a
           request log row (prompt hash only) and metrics

RPC methods (public ones authenticate the caller from ``auth`` in params):

    processInferenceRequest {request, auth}   stream of {"delta": text};
                                              trailer: model, finish_reason, usage,
                                              worker, request_id, latency_ms, ttft_ms
    processEmbeddingRequest {request, auth}   {model, embeddings: [[float]], usage,
                                              worker, request_id, latency_ms};
                                              request: {input: text | [text], model?}
                                              (model: [gateway] default_embedding_model)
    getServiceHealth        {}                the gateway's view: workers, models,
                                              ledger, quota
    getUserQuota            {auth, userId?}   usage and limits (admins may name a user)
    getUsage                {auth, since?, until?}  the caller's usage per day and key
    listModels              {auth}            every model served in the swarm

``request`` takes the inference role's prompt parameters (``prompt`` or
``messages``, ``model``, ``max_tokens``, ``temperature``, ``top_p``,
``stop``, ``seed``, ``stream``, ``format``, ``raw``, ``tools``,
``tool_choice``, ``parallel_tool_calls``; see :mod:`p2pinfer.prompts`). A
request needing a capability (``format``: ``json``; ``raw``: ``complete``;
``tools``: ``tools``) goes only to workers whose model has it;
if none has, MissingCapability (``data.capability``) before the quota
counts it.
With ``"stream": false`` (what ``Client.inference`` and the non-streaming
HTTP routes send) the worker sends the whole answer as one chunk once it is
complete: two frames per hop instead of one per token, and since the
client has seen nothing until then, a worker that dies mid-generation is
replaced like one that failed before its first token.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .. import __version__
from ..errors import (
    AuthenticationRequired,
    BackendTimeout,
    DeadlineExceeded,
    InvalidParams,
    LimitError,
    MalformedBackendResponse,
    P2PInferError,
    PermissionDenied,
)
from ..grants import RELAYS
from ..health import PROBLEM_KINDS
from ..prompts import ParamLimits, parse_embed_params, parse_prompt_params, parse_tool_calls
from ..rpc.server import Access, CallContext, rpc_method
from .coordinator import QuotaService
from .router import RoutedStream, WorkerRouter
from .settings import GatewaySettings
from .usage import UsageRecorder, prompt_hash

if TYPE_CHECKING:
    from ..context import RoleContext

__all__ = ["GatewayRole"]

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

log = logging.getLogger(__name__)

# Shape checks at the gateway are generous: the worker applies its own limits.
GATEWAY_LIMITS = ParamLimits(max_tokens=1_000_000, max_messages=1024,
                             max_prompt_chars=1_000_000)


def _tool_calls(trailer: dict[str, Any], worker: str | None) -> dict[str, Any]:
    """The calls a worker's answer made, checked before they go to a client."""
    if "tool_calls" not in trailer:
        return {}
    try:
        calls = parse_tool_calls(trailer["tool_calls"])
    except InvalidParams as exc:
        raise MalformedBackendResponse(
            f"worker {(worker or '-')[-8:]} sent bad tool calls: {exc.message}") from None
    return {"tool_calls": [c.to_dict() for c in calls]}


def share_of(user_id: str) -> str:
    """The opaque token a worker shares its slots by (one per user; the
    worker learns no user id from it)."""
    return hashlib.blake2b(user_id.encode(), digest_size=8, person=b"p2pinfer-share").hexdigest()


def _auth_params(params: Any) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise InvalidParams("params: must be a map with an auth entry", data={"field": "params"})
    auth = params.get("auth")
    if auth is None:
        raise AuthenticationRequired("an API key or a session token is required",
                                     data={"field": "auth"})
    if not isinstance(auth, dict):
        raise InvalidParams('auth: must be {"api_key": ...} or {"token": ...}',
                            data={"field": "auth"})
    return auth


_SOURCE = re.compile(r"^(ip|peer):[0-9A-Za-z.:_%-]{1,100}$")


def _source(ctx: CallContext, params: Any) -> str:
    """Whom to throttle for this call: the connection's address, or the
    client's address a member relayed (the web role passes the HTTP
    client's ``ip:...`` so its users are not throttled as one). Only a
    web or gateway member may relay one."""
    relayed = params.get("source") if isinstance(params, dict) else None
    if (RELAYS & ctx.grants and isinstance(relayed, str)
            and _SOURCE.match(relayed)):
        return relayed
    return ctx.source


class GatewayRole:
    """Serves the gateway RPC methods (see the module docstring)."""

    name = "gateway"

    def __init__(self, node: RoleContext) -> None:
        self.node = node
        self.settings = GatewaySettings.from_config(node.config)
        self.router = WorkerRouter(node, candidate_ttl=self.settings.candidate_ttl,
                                   cooldown=self.settings.cooldown,
                                   max_attempts=self.settings.max_attempts)
        self.quota = QuotaService(node, timeout=self.settings.coordinator_timeout)
        self.usage = UsageRecorder(node.ledger,
                                   journal=Path(f"{node.config.database_path}-usage"),
                                   flush_interval=self.settings.usage_flush_interval)
        node.serve(self.quota)
        node.on_disconnect(self.quota.on_peer_disconnected)
        self.auth = node.authenticator
        self.in_flight = 0
        self.served = 0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.router.run)
            await nursery.start(self.quota.run)
            await nursery.start(self.usage.run)
            task_status.started()

    def describe(self) -> dict[str, Any]:
        return {"in_flight": self.in_flight, "served": self.served}

    def topics(self) -> list[str]:
        return []

    # -- the inference flow ---------------------------------------------------------
    @rpc_method("processInferenceRequest", access=Access.PUBLIC)
    async def rpc_process_inference_request(
        self, ctx: CallContext, params: Any
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Authenticate, admit, route and stream one inference request."""
        started = trio.current_time()
        ctx.shorten_deadline(self.settings.request_timeout)
        auth = _auth_params(params)
        request = params.get("request")
        if isinstance(request, str):
            request = {"prompt": request}
        if not isinstance(request, dict):
            raise InvalidParams("request: must be a map of prompt parameters",
                                data={"field": "request"})
        principal = await self.auth.authenticate_waiting(auth, source=_source(ctx, params))
        parsed = parse_prompt_params(request, GATEWAY_LIMITS)
        model = parsed.model or self.settings.default_model
        worker_params = {k: v for k, v in request.items() if k != "modelConfig"}
        if isinstance(request.get("modelConfig"), dict):
            worker_params.update(request["modelConfig"])
        worker_params["model"] = model
        worker_params["share"] = share_of(principal.user_id)
        digest = prompt_hash(request)
        # refused before it counts against the user's quota
        await self.router.capable(model, parsed.needs)
        lease = await self._admit(principal, model, digest, started)
        route = RoutedStream(model=model)
        chunks = 0
        # Until the stream ends we assume the caller went away (GeneratorExit
        # or Cancelled reach us when the client cancels or the deadline hits).
        status = "cancelled"
        self.in_flight += 1
        try:
            async with aclosing(self.router.stream(model, worker_params, route,
                                                   parsed.needs)) as stream:
                async for chunk in stream:
                    chunks += 1
                    yield chunk
            status = "success"
            ctx.trailer = self._trailer(route, model, ctx, started)
        except P2PInferError as exc:
            status = "timeout" if isinstance(exc, DeadlineExceeded | BackendTimeout) else "error"
            raise
        except Exception:
            status = "error"
            raise
        finally:
            self.in_flight -= 1
            self.served += 1
            if status == "cancelled" and trio.current_time() >= ctx.deadline:
                status = "timeout"
            # the worker's count, else (it never arrived) one token per chunk
            await self._settle(principal, lease, route, model, digest, status, started,
                               fallback_tokens=chunks)

    async def _admit(self, principal: Any, model: str, digest: str, started: float) -> Any:
        """A quota ticket for one request of ``principal`` (LimitError if over)."""
        quota_key = principal.api_key_id or f"session-{principal.user_id}"
        limits = self.settings.limits_for(principal.tier)
        self.node.metrics.touch_user(principal.user_id)
        try:
            return await self.quota.acquire(principal.user_id, quota_key, limits)
        except LimitError:
            self.node.metrics.rate_limit_violation(principal.user_id, principal.api_key_id)
            self._record(principal, model, digest, "rate_limited", 0, started, counted=False)
            raise

    async def _settle(self, principal: Any, lease: Any, route: RoutedStream, model: str,
                      digest: str, status: str, started: float, *,
                      fallback_tokens: int) -> None:
        """Return the ticket with the tokens used; log, record and count the request."""
        usage = (route.trailer or {}).get("usage")
        if status == "success" and isinstance(usage, dict):
            tokens = int(usage.get("total_tokens") or 0)
        else:
            tokens = fallback_tokens
        with trio.CancelScope(shield=True):
            await self.quota.release(lease, tokens)
        served_model = str((route.trailer or {}).get("model") or model)
        log.info("request %s: %s via worker %s, %d tokens, %.0f ms", status, served_model,
                 (route.worker or "-")[-8:], tokens, (trio.current_time() - started) * 1000)
        self._record(principal, served_model, digest, status, tokens, started, counted=True)
        self.node.metrics.observe_request(service="gateway", model=served_model,
                                          seconds=trio.current_time() - started,
                                          tokens=tokens, user_id=principal.user_id)

    @rpc_method("processEmbeddingRequest", access=Access.PUBLIC)
    async def rpc_process_embedding_request(self, ctx: CallContext, params: Any
                                            ) -> dict[str, Any]:
        """Authenticate, admit and route one embedding request (a request
        against the quota like an answer; its tokens are the input's)."""
        started = trio.current_time()
        ctx.shorten_deadline(self.settings.request_timeout)
        auth = _auth_params(params)
        request = params.get("request")
        if not isinstance(request, dict):
            raise InvalidParams("request: must be a map with input (and model)",
                                data={"field": "request"})
        principal = await self.auth.authenticate_waiting(auth, source=_source(ctx, params))
        parsed = parse_embed_params(request)
        model = parsed.model or self.settings.default_embedding_model
        needs = frozenset({"embed"})
        await self.router.capable(model, needs)  # before it counts against the quota
        digest = prompt_hash(request)
        lease = await self._admit(principal, model, digest, started)
        route = RoutedStream(model=model)
        worker_params = {"input": list(parsed.texts), "model": model,
                         "share": share_of(principal.user_id)}
        vectors: Any = None
        status = "cancelled"
        self.in_flight += 1
        try:
            async with aclosing(self.router.stream(model, worker_params, route, needs,
                                                   method="embed")) as stream:
                async for chunk in stream:
                    vectors = chunk.get("embeddings") if isinstance(chunk, dict) else None
            if not (isinstance(vectors, list) and len(vectors) == len(parsed.texts)
                    and all(isinstance(v, list) and v for v in vectors)):
                raise MalformedBackendResponse(
                    f"worker {(route.worker or '-')[-8:]} sent no vector for each input")
            status = "success"
        except P2PInferError as exc:
            status = "timeout" if isinstance(exc, DeadlineExceeded | BackendTimeout) else "error"
            raise
        except Exception:
            status = "error"
            raise
        finally:
            self.in_flight -= 1
            self.served += 1
            await self._settle(principal, lease, route, model, digest, status, started,
                               fallback_tokens=0)
        trailer = self._trailer(route, model, ctx, started)
        return {"model": trailer["model"], "embeddings": vectors, "usage": trailer["usage"],
                "worker": route.worker, "request_id": ctx.request_id,
                "latency_ms": trailer["latency_ms"]}

    @staticmethod
    def _trailer(route: RoutedStream, model: str, ctx: CallContext,
                 started: float) -> dict[str, Any]:
        trailer = route.trailer or {}
        usage = trailer.get("usage") if isinstance(trailer.get("usage"), dict) else {}
        return {
            "model": trailer.get("model", model),
            "finish_reason": trailer.get("finish_reason"),
            "usage": usage,
            "usage_exact": trailer.get("usage_exact", True),
            "cached": trailer.get("cached", False),
            "worker": route.worker,
            "request_id": ctx.request_id,
            "latency_ms": round((trio.current_time() - started) * 1000, 1),
            "ttft_ms": None if route.first_token_at is None
            else round((route.first_token_at - started) * 1000, 1),
            # the worker's own view, to tell network and gateway time from model time
            "worker_latency_ms": trailer.get("latency_ms"),
            "worker_queue_ms": trailer.get("queue_ms"),
            # the model's first token on the worker, even when the answer
            # travels whole ("stream": false) and the gateway sees one frame
            "worker_ttft_ms": trailer.get("ttft_ms"),
            **_tool_calls(trailer, route.worker),
        }

    def _record(self, principal: Any, model: str, digest: str, status: str, tokens: int,
                started: float, *, counted: bool) -> None:
        self.usage.record(
            user_id=principal.user_id,
            api_key_id=principal.api_key_id,
            model=model,
            prompt_sha256=digest,
            status=status,
            tokens=tokens,
            latency_ms=(trio.current_time() - started) * 1000,
            counted=counted,
        )

    # -- views ------------------------------------------------------------------------
    @rpc_method("getServiceHealth", access=Access.PUBLIC)
    async def rpc_get_service_health(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """The gateway's view of the swarm (no user data)."""
        if params not in (None, {}):
            raise InvalidParams("params: getServiceHealth takes none")
        workers = await self.node.discovery.find_role("inference")
        models: dict[str, list[str]] = {}
        for desc in workers:
            if not self.node.is_member(desc.peer_id):
                continue
            for entry in desc.models():
                name = str(entry.get("name"))
                if entry.get("status") in (None, "loaded", "loading"):
                    models.setdefault(name, []).append(desc.peer_id)
        metrics = self.node.metrics
        ledger = metrics.ledger_health()
        reasons = [] if models else ["no worker serves any model"]
        # what this node itself lacks (kinds only: PUBLIC)
        reasons += [PROBLEM_KINDS.get(str(p.get("kind")), str(p.get("kind")))
                    for p in metrics.health().get("problems", [])]
        return {
            "status": "degraded" if reasons else "ok",
            "reasons": reasons,
            "peer_id": self.node.peer_id,
            "version": __version__,
            "uptime": time.time() - self.node.started_at,
            "workers": len([d for d in workers if self.node.is_member(d.peer_id)]),
            "models": models,
            "in_flight": self.in_flight,
            "served": self.served,
            "ledger": ledger,
            "quota": {"tickets_held": self.quota.book.held(),
                      "granted": self.quota.book.granted, "denied": self.quota.book.denied,
                      "coordinator_failovers": self.quota.failovers},
            "usage_pending": self.usage.pending(),
            # failed ledger writes of usage (a full disk): retried, nothing dropped
            "usage_flush_failures": self.usage.flush_failures,
            "cooling_down": [p for p, s in self.router.stats.items()
                             if s.cooled_until > trio.current_time()],
        }

    @rpc_method("getUserQuota", access=Access.PUBLIC)
    async def rpc_get_user_quota(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """Usage in the current window and the limits that apply."""
        principal = self.auth.authenticate(_auth_params(params), source=_source(ctx, params))
        user_id = principal.user_id
        tier = principal.tier
        wanted = params.get("userId", params.get("user_id"))
        if wanted is not None and wanted != user_id:
            if not principal.is_admin:
                raise PermissionDenied("only admins may read another user's quota")
            user = self.node.ledger.user(wanted)
            if user is None:
                from ..errors import NotFound

                raise NotFound(f"no user {str(wanted)[:64]!r}")
            user_id, tier = user.id, user.tier
        limits = self.settings.limits_for(tier)
        usage = await self.quota.usage(user_id)
        remaining = max(0, limits.requests_per_window - int(usage.get("requests", 0)))
        tokens_left = (None if limits.tokens_per_window is None
                       else max(0, limits.tokens_per_window - int(usage.get("tokens", 0))))
        return {
            "user_id": user_id,
            "tier": tier,
            "window": "hour",
            "limits": limits.to_wire(),
            "usage": usage,
            "remaining": {"requests": remaining, "tokens": tokens_left},
            "reset": usage.get("reset"),
        }

    @rpc_method("getUsage", access=Access.PUBLIC)
    async def rpc_get_usage(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """The caller's usage per day and API key, from this gateway's ledger
        copy (``since``/``until``: ``YYYY-MM-DD``, inclusive)."""
        principal = self.auth.authenticate(_auth_params(params), source=_source(ctx, params))
        since, until = params.get("since"), params.get("until")
        for name, value in (("since", since), ("until", until)):
            if value is not None and (not isinstance(value, str)
                                      or not _DATE.match(value)):
                raise InvalidParams(f"{name}: must be a date YYYY-MM-DD", data={"field": name})
        rows = self.node.ledger.usage(user_id=principal.user_id, since=since, until=until)
        return {"user_id": principal.user_id,
                "usage": [{"date": r.date, "api_key_id": r.api_key_id,
                           "requests": r.request_count, "tokens": r.tokens_used} for r in rows]}

    @rpc_method("listModels", access=Access.PUBLIC)
    async def rpc_list_models(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """Every model served by a member worker, with how many workers serve
        it and what it can do (``capabilities``: ``chat``, ``json``, ``complete``; the
        union over its workers: a request is routed to those that can)."""
        self.auth.authenticate(_auth_params(params), source=_source(ctx, params))
        return {"models": await self.swarm_models()}

    async def swarm_models(self) -> list[dict[str, Any]]:
        merged: dict[str, dict[str, Any]] = {}
        for desc in await self.node.discovery.find_role("inference"):
            if not self.node.is_member(desc.peer_id):
                continue
            for entry in desc.models():
                name = str(entry.get("name"))
                item = merged.setdefault(name, {
                    "name": name, "aliases": sorted(set(entry.get("aliases") or [])),
                    "backend": entry.get("backend"), "context_length": entry.get("context_length"),
                    "workers": 0, "free_slots": 0, "queue_depth": 0, "status": "error",
                    "runners": [], "capabilities": [], "created": None})
                item["workers"] += 1
                created = entry.get("created")
                if isinstance(created, int) and created > 0:  # the earliest worker's
                    item["created"] = min(item["created"] or created, created)
                caps = entry.get("capabilities")
                caps = caps if isinstance(caps, list) else ["chat"]  # an older worker
                item["capabilities"] = sorted({*item["capabilities"],
                                               *(str(c)[:32] for c in caps[:16])})
                runner = entry.get("runner")
                if isinstance(runner, str) and runner not in item["runners"]:
                    item["runners"] = sorted([*item["runners"], runner[:120]])
                item["free_slots"] += int(entry.get("free_slots") or 0)
                item["queue_depth"] += int(entry.get("queue_depth") or 0)
                if entry.get("status") == "loaded" or item["status"] != "loaded":
                    item["status"] = entry.get("status") or item["status"]
        return sorted(merged.values(), key=lambda m: m["name"])

