"""What a node serves its own front-door processes (``web.*`` methods).

A front-door process serves the web app from a process of its own (see
:mod:`p2pinfer.web.frontdoor`) and reaches the swarm through its node: it
connects to the node's local socket (``<home>/run/web.sock``, mode 0600)
and calls these methods, each the node-side half of one
:class:`~p2pinfer.web.upstream.WebUpstream` method, answered by the web
role's own :class:`~p2pinfer.web.upstream.Upstream`. Calls on that socket
come from the node itself; these methods refuse any other caller, so no
peer on the network can reach them.

``source`` (the HTTP client's address, as the app saw it) travels with
each call, so that auth and gateway nodes throttle the client, not the
node.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from ..errors import InvalidParams, PermissionDenied
from ..grants import ROLES
from ..rpc.server import Access, CallContext, rpc_method
from .inputs import current_source

if TYPE_CHECKING:  # pragma: no cover
    from ..context import Metrics
    from .upstream import Upstream

__all__ = ["FrontDoorService"]



def _dict(params: Any, *keys: str) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise InvalidParams("params must be a map")
    missing = [k for k in keys if k not in params]
    if missing:
        raise InvalidParams(f"{missing[0]}: required", data={"field": missing[0]})
    return params


def _str(params: dict[str, Any], key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidParams(f"{key}: must be a non-empty string", data={"field": key})
    return value


def _role(params: dict[str, Any]) -> str:
    role = params.get("role")
    if role not in ROLES:
        raise InvalidParams(f"role: one of {', '.join(ROLES)}", data={"field": "role"})
    return str(role)


def _auth(params: dict[str, Any]) -> dict[str, str]:
    auth = params.get("auth")
    if not (isinstance(auth, dict) and len(auth) == 1
            and next(iter(auth)) in ("api_key", "token")
            and isinstance(next(iter(auth.values())), str)):
        raise InvalidParams('auth: must be {"api_key": ...} or {"token": ...}',
                            data={"field": "auth"})
    return auth


class FrontDoorService:
    """The ``web.*`` methods (see the module docstring).

    Args:
        upstream: the web role's upstream in this node.
        peer_id: this node's peer id (the only caller served).
        metrics: where the front doors' HTTP request counts are added.
    """

    def __init__(self, upstream: Upstream, peer_id: str, metrics: Metrics) -> None:
        self.upstream = upstream
        self.peer_id = peer_id
        self.metrics = metrics

    def _local(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        if ctx.peer_id != self.peer_id:
            raise PermissionDenied("web.* methods serve this node's own front doors only")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise InvalidParams("params must be a map")
        source = params.get("source")
        current_source.set(source if isinstance(source, str) else None)
        return params

    @rpc_method("web.authenticate", access=Access.MEMBER)
    async def rpc_authenticate(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """``{auth, source?}`` → the principal (``Principal.to_wire``)."""
        p = self._local(ctx, params)
        return (await self.upstream.authenticate(_auth(_dict(p, "auth")))).to_wire()

    @rpc_method("web.session", access=Access.MEMBER)
    async def rpc_session(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """``{token}`` → the principal of a session token."""
        p = self._local(ctx, params)
        return (await self.upstream.session(_str(_dict(p, "token"), "token"))).to_wire()

    @rpc_method("web.waitForUser", access=Access.MEMBER)
    async def rpc_wait_for_user(self, ctx: CallContext, params: Any) -> None:
        """``{user_id}``: returns once the ledger knows the user (at most 3 s)."""
        p = self._local(ctx, params)
        await self.upstream.wait_for_user(_str(_dict(p, "user_id"), "user_id"))

    @rpc_method("web.peers", access=Access.MEMBER)
    async def rpc_peers(self, ctx: CallContext, params: Any) -> list[str]:
        """``{role}`` → member nodes with the role, this one first."""
        p = self._local(ctx, params)
        return await self.upstream.peers(_role(p))

    @rpc_method("web.call", access=Access.MEMBER)
    async def rpc_call(self, ctx: CallContext, params: Any) -> Any:
        """``{role, method, params, long?, source?}``: ``method`` on a node
        with ``role``, with failover."""
        p = self._local(ctx, params)
        role = _role(_dict(p, "role", "method"))
        return await self.upstream.call(role, _str(p, "method"), p.get("params"),
                                        long=bool(p.get("long")))

    @rpc_method("web.embed", access=Access.MEMBER)
    async def rpc_embed(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """``{request, auth, source?}``: ``processEmbeddingRequest``."""
        p = _dict(self._local(ctx, params), "request", "auth")
        if not isinstance(p["request"], dict):
            raise InvalidParams("request: must be a map", data={"field": "request"})
        return await self.upstream.embed(p["request"], _auth(p))

    @rpc_method("web.inference", access=Access.MEMBER)
    async def rpc_inference(self, ctx: CallContext,
                            params: Any) -> AsyncGenerator[Any, None]:
        """``{request, auth, stream, source?}``: the gateway's answer relayed
        chunk by chunk (its first event awaited before anything is sent, so
        its errors come first); the trailer is the gateway's, with
        ``gateway`` (the peer that served it)."""
        p = _dict(self._local(ctx, params), "request", "auth")
        if not isinstance(p["request"], dict):
            raise InvalidParams("request: must be a map", data={"field": "request"})
        call = await self.upstream.inference(p["request"], _auth(p),
                                             stream=p.get("stream", True) is not False)
        try:
            async for chunk in call.raw_chunks():
                yield chunk
            ctx.trailer = {**call.trailer, "gateway": call.gateway}
        finally:
            await call.aclose()

    @rpc_method("web.account", access=Access.MEMBER)
    async def rpc_account(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """``{user_id, since, logs}`` → the dashboard's data of a user."""
        p = _dict(self._local(ctx, params), "user_id", "since")
        logs = p.get("logs", 15)
        if not isinstance(logs, int) or isinstance(logs, bool) or not 0 <= logs <= 100:
            raise InvalidParams("logs: an integer from 0 to 100", data={"field": "logs"})
        return await self.upstream.account(_str(p, "user_id"), since=_str(p, "since"),
                                           logs=logs)

    @rpc_method("web.members", access=Access.MEMBER)
    async def rpc_members(self, ctx: CallContext, params: Any) -> list[dict[str, Any]]:
        """The network's members."""
        self._local(ctx, params)
        return await self.upstream.members()

    @rpc_method("web.countRequests", access=Access.MEMBER)
    async def rpc_count_requests(self, ctx: CallContext, params: Any) -> None:
        """``{counts: [[service, method, status, n], ...]}``: HTTP requests
        a front door served, added to this node's metrics."""
        p = _dict(self._local(ctx, params), "counts")
        counts = p["counts"]
        if not isinstance(counts, list) or len(counts) > 10_000:
            raise InvalidParams("counts: a list of [service, method, status, n]",
                                data={"field": "counts"})
        for item in counts:
            if not (isinstance(item, list) and len(item) == 4
                    and all(isinstance(x, str) for x in item[:3])
                    and isinstance(item[3], int) and 0 < item[3] <= 10**9):
                raise InvalidParams("counts: a list of [service, method, status, n]",
                                    data={"field": "counts"})
        for service, method, status, n in counts:
            self.metrics.count_request(service, method, status, n)
