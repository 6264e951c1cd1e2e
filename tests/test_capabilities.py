"""Capabilities, not membership: one test per row of the capability table
in docs/security.md.

A swarm of real nodes on loopback: a hub (auth, gateway, metrics, and a
synthetic model), and four member keys that call it: an inference-only
worker, a gateway, an operator key and a metrics node. Each row checks that a member
without the grant gets ``PermissionDenied`` and one with it does not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pinfer import errors
from p2pinfer.client import Client
from p2pinfer.grants import GRANTS
from p2pinfer.rpc import RpcServer

from .helpers import make_network, node_config, run_network, run_nodes, wait_for

PASSWORD = "correct horse battery 9"
FAST = {"argon2_memory_kib": 1024, "argon2_time_cost": 1, "registration_wait": 0}
TABLES: dict[str, Any] = {
    "models": [{"name": "fake", "backend": "synthetic", "tokens": 2}],
    "auth": FAST,
    "metrics": {"prometheus_port": 0, "interval": 60.0},
}
CERTS = [["auth", "gateway", "metrics", "inference"], ["inference"], ["gateway"], ["operator"],
         ["metrics"]]


@asynccontextmanager
async def swarm(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[dict[str, Any]]:
    homes = make_network(tmp_path, ["hub", "worker", "gateway", "operator", "metrics"],
                         roles=CERTS)
    async with run_network(nursery, homes[:1], roles=CERTS[0], tables=TABLES) as (hub,):
        # the others run no role: what matters is what their keys may call
        configs = [node_config(h, roles=[], bootstrap=[hub.addrs[0]]) for h in homes[1:]]
        async with run_nodes(nursery, configs) as others:
            worker, gateway, operator, metrics = others
            await wait_for(lambda: all(hub.is_member(n.peer_id) for n in others), limit=20)
            async with Client(bootstrap=[hub.addrs[0]]) as client:
                user = await client.register("dora", "dora@example.org", PASSWORD)
            yield {"hub": hub, "worker": worker, "gateway": gateway, "operator": operator,
                   "metrics": metrics, "user_id": user["user_id"]}


# (method, params builder, grant that allows it) — the capability table
ROWS: list[tuple[str, Any, str]] = [
    ("setUserTier", lambda u: {"as_operator": True, "user_id": u, "tier": "premium"},
     "operator"),
    ("setUserActive", lambda u: {"as_operator": True, "user_id": u, "is_active": True},
     "operator"),
    ("setUserAdmin", lambda u: {"as_operator": True, "user_id": u, "is_admin": False},
     "operator"),
    ("exportUserData", lambda u: {"as_operator": True, "user_id": u}, "operator"),
    ("getAuditLog", lambda u: {}, "operator"),
    ("getMetrics", lambda u: {}, "operator"),
    ("getNodeMetrics", lambda u: None, "operator"),
    ("listAvailableModels", lambda u: None, "operator"),
    ("getModelStatus", lambda u: None, "operator"),
    ("quota.usage", lambda u: {"user_id": u}, "gateway"),
    ("quota.acquire", lambda u: {"user_id": u, "key_id": None,
                                 "limits": {"requests_per_hour": 5}}, "gateway"),
    ("processPrompt", lambda u: {"prompt": "hi", "max_tokens": 1}, "gateway"),
    ("ledgerLogPull", lambda u: {"after": {}}, "metrics"),
    ("ledgerLogs", lambda u: {"user_id": u}, "gateway"),
]
STREAMS = ("processPrompt", "ledgerLogPull", "ledgerLogs")


async def call(node: Any, peer: str, method: str, params: Any) -> Any:
    with trio.fail_after(10):
        if method in STREAMS:
            async with node.rpc.stream(peer, method, params) as chunks:
                return [c async for c in chunks]
        return await node.rpc.call(peer, method, params)


async def test_every_row_of_the_capability_table(tmp_path: Path,
                                                 nursery: trio.Nursery) -> None:
    with trio.fail_after(120):
        async with swarm(tmp_path, nursery) as s:
            hub, uid = s["hub"], s["user_id"]
            for method, params, grant in ROWS:
                # an inference-only member is refused every one of them
                with pytest.raises(errors.PermissionDenied) as refused:
                    await call(s["worker"], hub.peer_id, method, params(uid))
                assert grant in str(refused.value.message) or "operator" in str(
                    refused.value.message), (method, refused.value.message)
                # the member holding the grant is let through (its answer,
                # or an error about the params, but not PermissionDenied)
                try:
                    await call(s[grant], hub.peer_id, method, params(uid))
                except errors.PermissionDenied as exc:  # pragma: no cover - the failure
                    raise AssertionError(f"{method}: {grant} refused: {exc.message}") from exc
                except errors.P2PInferError:
                    pass
            # the rows without as_operator are refused by the RPC layer itself
            at_the_door = [m for m, params, _ in ROWS if "as_operator" not in (params(uid) or {})]
            assert hub.rpc_server.stats.denied == len(at_the_door)
            # eraseUser as the operator (last: it erases the user)
            with pytest.raises(errors.PermissionDenied):
                await call(s["worker"], hub.peer_id, "eraseUser",
                           {"as_operator": True, "user_id": uid})
            await call(s["operator"], hub.peer_id, "eraseUser",
                       {"as_operator": True, "user_id": uid})


async def test_only_a_web_or_gateway_member_may_relay_a_client_address(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """A worker naming a "source" is throttled (and audited) as itself."""
    with trio.fail_after(120):
        async with swarm(tmp_path, nursery) as s:
            hub = s["hub"]
            for who, expected in (("worker", "ip:127.0.0.1"), ("gateway", "ip:10.9.8.7")):
                with pytest.raises(errors.InvalidCredentials):
                    await call(s[who], hub.peer_id, "loginUser",
                               {"username": "dora", "password": "wrong password 1",
                                "source": "ip:10.9.8.7"})
                rows = hub.ledger.audit(action="user.login", limit=1)
                assert rows and rows[0].source == expected, (who, rows)


def test_a_server_without_grants_lets_members_do_everything() -> None:
    """The RPC layer's default (no membership view: a benchmark, a wire
    test) grants members everything and non-members nothing."""
    server = RpcServer(is_member=lambda peer: peer == "m")
    assert server.grants_for("m", True) == frozenset(GRANTS)
    assert server.grants_for("x", False) == frozenset()
