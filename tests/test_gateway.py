"""The gateway role end to end: real nodes on loopback, real ledger, real auth,
the real embedded model or the synthetic load-test backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from p2pinfer import errors
from p2pinfer.client import Client

from .helpers import make_network, wait_for

PASSWORD = "correct horse battery 9"


def synthetic(tokens: int = 8, token_delay: float = 0.0, first_token_delay: float = 0.0,
              name: str = "fake") -> dict[str, Any]:
    return {"models": [{"name": name, "backend": "synthetic", "tokens": tokens,
                        "token_delay": token_delay, "first_token_delay": first_token_delay}]}


async def new_user_with_key(node: Any, name: str = "alice") -> dict[str, Any]:
    """Register, log in and issue a key through the auth role's RPC methods."""
    peer = node.peer_id
    await node.rpc.call(peer, "registerUser", {"username": name, "email": f"{name}@example.com",
                                               "password": PASSWORD})
    session = await node.rpc.call(peer, "loginUser", {"username": name, "password": PASSWORD})
    key = await node.rpc.call(peer, "generateApiKey", {"token": session["token"],
                                                       "name": "test key"})
    return {"user_id": session["user"]["user_id"], "token": session["token"],
            "api_key": key["api_key"], "key_id": key["key_id"]}


async def ask(node: Any, gateway: str, auth: dict[str, str], request: dict[str, Any]
              ) -> tuple[str, dict[str, Any]]:
    async with node.rpc.stream(gateway, "processInferenceRequest",
                               {"request": request, "auth": auth}) as s:
        text = "".join([c["delta"] async for c in s])
    return text, s.trailer


async def test_client_peer_streams_from_the_real_model(tmp_path: Path,
                                                       nursery: trio.Nursery) -> None:
    """A non-member client with an API key, through a gateway, to a worker
    running the embedded model: tokens arrive as they are generated."""
    homes = make_network(tmp_path, ["gw", "worker"],
                         roles=[["auth", "gateway"], ["inference"]])
    gw, worker = await start(nursery, homes, [["auth", "gateway"], ["inference"]],
                             per_node_tables=[{}, {"inference": {"slots": 1}}])
    try:
        with trio.fail_after(120):
            creds = await new_user_with_key(gw)
            await wait_for(lambda: gw.discovery.find_model("smollm2"), limit=30)
            async with Client(bootstrap=[gw.addrs[0]], api_key=creds["api_key"]) as client:
                arrivals: list[float] = []
                # a long answer (~0.6 s here): several of the runner's 50 ms chunks
                async with client.stream("Write a long story about a lighthouse keeper.",
                                         model="smollm2", max_tokens=64,
                                         temperature=0) as stream:
                    parts = []
                    async for part in stream:
                        parts.append(part)
                        arrivals.append(trio.current_time())
                response = stream.response
                assert response is not None
                assert response.text == "".join(parts) and response.text.strip()
                assert len(parts) > 3 and arrivals[-1] - arrivals[0] > 0.02  # streamed
                assert response.worker == worker.peer_id and response.model == "smollm2"
                assert response.usage["completion_tokens"] >= len(parts) >= 1
                assert response.usage["total_tokens"] == (response.usage["prompt_tokens"]
                                                          + response.usage["completion_tokens"])
                again = await client.inference("Write a long story about a lighthouse keeper.",
                                               model="smollm2", max_tokens=64, temperature=0)
                assert again.text == response.text  # deterministic at temperature 0
                models = await client.models()
                # the embedded models: SmolLM2 and the all-minilm embedding model
                assert [m["name"] for m in models] == ["all-minilm", "smollm2"]
                # What runs it, from the worker's signed descriptor.
                variant = worker.roles["inference"].engine.models["smollm2"].backend.variant()
                assert models[1]["runners"] == [variant]
                assert variant.startswith("llama-server, ")
                quota = await client.quota()
                assert quota["usage"]["requests"] == 2 and quota["limits"]["requests"] == 100
    finally:
        worker.stop()
        gw.stop()


async def start(nursery: trio.Nursery, homes: list[Path], roles: list[list[str]],
                tables: dict[str, Any] | None = None,
                per_node_tables: list[dict[str, Any]] | None = None) -> list[Any]:
    from p2pinfer.node import Node

    from .helpers import node_config

    nodes: list[Any] = []
    for i, (home, node_roles) in enumerate(zip(homes, roles, strict=True)):
        t = dict(tables or {})
        if per_node_tables:
            t.update(per_node_tables[i])
        boot = [nodes[0].addrs[0]] if nodes else []
        node = Node(node_config(home, roles=node_roles, bootstrap=boot, tables=t,
                                descriptor_ttl=1.0, announce_interval=1.0))
        await nursery.start(node.run)
        nodes.append(node)
    return nodes


async def gateways_see_workers(nodes: list[Any], model: str, n: int) -> None:
    for node in nodes:
        if "gateway" in node.roles:
            await wait_for(lambda node=node: _count(node, model, n), limit=30)


async def _count(node: Any, model: str, n: int) -> bool:
    return len(await node.discovery.find_model(model)) >= n


async def test_limit_admits_exactly_the_configured_number(tmp_path: Path,
                                                          nursery: trio.Nursery) -> None:
    homes = make_network(tmp_path, ["gw", "w"], roles=[["auth", "gateway"], ["inference"]])
    nodes = await start(nursery, homes, [["auth", "gateway"], ["inference"]],
                        tables={**synthetic(), "gateway": {"default_rate_limit": 7}})
    gw, _ = nodes
    with trio.fail_after(60):
        creds = await new_user_with_key(gw)
        await gateways_see_workers(nodes, "fake", 1)
        auth = {"api_key": creds["api_key"]}
        for _ in range(7):
            text, trailer = await ask(gw, gw.peer_id, auth, {"prompt": "hi", "model": "fake"})
            assert trailer["usage"]["completion_tokens"] == 8
        with pytest.raises(errors.RateLimited) as ei:
            await ask(gw, gw.peer_id, auth, {"prompt": "hi", "model": "fake"})
        assert 0 < ei.value.retry_after <= 3600
        assert ei.value.data["limit"] == 7 and ei.value.data["scope"] == "user"
        quota = await gw.rpc.call(gw.peer_id, "getUserQuota", {"auth": auth})
        assert quota["remaining"]["requests"] == 0 and quota["usage"]["requests"] == 7
    for n in nodes:
        n.stop()


async def test_bad_requests_get_specific_errors(tmp_path: Path, nursery: trio.Nursery) -> None:
    homes = make_network(tmp_path, ["gw", "w"], roles=[["auth", "gateway"], ["inference"]])
    nodes = await start(nursery, homes, [["auth", "gateway"], ["inference"]],
                        tables=synthetic())
    gw, _ = nodes
    with trio.fail_after(60):
        creds = await new_user_with_key(gw)
        await gateways_see_workers(nodes, "fake", 1)
        good = {"api_key": creds["api_key"]}
        cases: list[tuple[Any, type[Exception]]] = [
            ({"request": {"prompt": "x"}}, errors.AuthenticationRequired),
            ({"request": {"prompt": "x"}, "auth": {"api_key": "p2p_nope_nope"}},
             errors.InvalidApiKey),
            ({"request": {"prompt": "x"}, "auth": "key"}, errors.InvalidParams),
            ({"request": {"prompt": "x", "temprature": 1}, "auth": good}, errors.InvalidParams),
            ({"request": 5, "auth": good}, errors.InvalidParams),
            ({"request": {"prompt": "x", "model": "no-such-model"}, "auth": good},
             errors.NoWorkerAvailable),
            ({"request": {"prompt": "x", "model": "fake"}, "auth": {"token": "abc.def.ghi"}},
             errors.InvalidToken),
        ]
        for params, error in cases:
            with pytest.raises(error):
                async with gw.rpc.stream(gw.peer_id, "processInferenceRequest", params) as s:
                    async for _ in s:
                        pass
        # and the gateway keeps serving
        text, _ = await ask(gw, gw.peer_id, good, {"prompt": "x", "model": "fake"})
        assert text
        health = await gw.rpc.call(gw.peer_id, "getServiceHealth", {})
        assert health["status"] == "ok" and "fake" in health["models"]
        assert health["quota"]["tickets_held"] == 0
    for n in nodes:
        n.stop()


async def test_three_gateways_share_one_limit_and_exact_usage(tmp_path: Path,
                                                              nursery: trio.Nursery) -> None:
    """One key hammered round-robin across three gateways: the limit holds
    swarm-wide, and the replicated usage equals what the backend reported."""
    roles = [["auth", "gateway"], ["gateway"], ["gateway"], ["inference"]]
    homes = make_network(tmp_path, ["g1", "g2", "g3", "w"], roles=roles)
    limit = 30
    nodes = await start(nursery, homes, roles, tables={
        **synthetic(tokens=5), "gateway": {"default_rate_limit": limit, "concurrent_per_key": 0,
                                           "concurrent_per_user": 0,
                                           "usage_flush_interval": 0.2}})
    gateways = nodes[:3]
    with trio.fail_after(90):
        creds = await new_user_with_key(gateways[0])
        for g in gateways:
            await wait_for(lambda g=g: g.ledger.api_key(creds["api_key"].split("_")[1]))
        await gateways_see_workers(nodes, "fake", 1)
        auth = {"api_key": creds["api_key"]}
        accepted = 0
        denied = 0
        reported_tokens = 0

        async def one(i: int) -> None:
            nonlocal accepted, denied, reported_tokens
            g = gateways[i % 3]
            try:
                _, trailer = await ask(g, g.peer_id, auth,
                                       {"prompt": f"hello number {i}", "model": "fake"})
            except errors.RateLimited:
                denied += 1
                return
            accepted += 1
            reported_tokens += trailer["usage"]["total_tokens"]

        async with trio.open_nursery() as n:
            for i in range(60):
                n.start_soon(one, i)
        assert accepted + denied == 60
        assert accepted <= limit * 1.05
        assert accepted == limit  # one coordinator: exact
        # usage_stats on every node converges to exactly what the backend reported
        for node in nodes:
            await wait_for(lambda node=node: _usage_total(node, creds["user_id"])
                           == (accepted, reported_tokens), limit=20)
    for n in nodes:
        n.stop()


def _usage_total(node: Any, user_id: str) -> tuple[int, int]:
    rows = node.ledger.usage(user_id=user_id)
    return (sum(r.request_count for r in rows), sum(r.tokens_used for r in rows))


async def gateway_and_two_slow_workers(tmp_path: Path, nursery: trio.Nursery) -> list[Any]:
    """A gateway (with auth) and two workers whose answers take 2 s (40
    tokens, 50 ms apart): time to stop one of them mid-answer."""
    roles = [["auth", "gateway"], ["inference"], ["inference"]]
    homes = make_network(tmp_path, ["gw", "w1", "w2"], roles=roles)
    return await start(nursery, homes, roles, tables={
        "gateway": {"concurrent_per_key": 0,
                    "concurrent_per_user": 0, "default_rate_limit": 10_000, "cooldown": 30}},
        per_node_tables=[{}, synthetic(tokens=40, token_delay=0.05),
                         synthetic(tokens=40, token_delay=0.05)])


async def test_worker_death_retries_unstarted_requests(tmp_path: Path,
                                                       nursery: trio.Nursery) -> None:
    """Kill a worker under load: requests it had not started streaming are
    retried on the other worker; requests that had started end with a clear
    StreamInterrupted error."""
    gw, w1, w2 = nodes = await gateway_and_two_slow_workers(tmp_path, nursery)
    with trio.fail_after(90):
        creds = await new_user_with_key(gw)
        await gateways_see_workers(nodes, "fake", 2)
        auth = {"api_key": creds["api_key"]}
        outcomes: dict[int, str] = {}

        async def one(i: int) -> None:
            got_tokens = False
            try:
                async with gw.rpc.stream(gw.peer_id, "processInferenceRequest",
                                         {"request": {"prompt": f"q{i}", "model": "fake"},
                                          "auth": auth}) as s:
                    async for _ in s:
                        got_tokens = True
                outcomes[i] = "w2" if s.trailer["worker"] == w2.peer_id else "w1"
            except errors.StreamInterrupted as exc:
                assert got_tokens and exc.data["worker"] == w1.peer_id
                outcomes[i] = "interrupted"

        router = gw.roles["gateway"].router
        async with trio.open_nursery() as n:
            for i in range(10):
                n.start_soon(one, i)
            await wait_for(lambda: router.stats.get(w1.peer_id) is not None
                           and router.stats[w1.peer_id].in_flight > 0)
            await trio.sleep(0.3)  # tokens are flowing from w1 (a 2 s answer)
            w1.stop()
            for i in range(10, 16):  # after the death: served by w2, nothing lost
                n.start_soon(one, i)
        assert sorted(outcomes) == list(range(16))  # every request got an outcome
        assert "interrupted" in outcomes.values()  # w1's streams were cut, with an error
        assert "w1" not in outcomes.values()  # nothing was claimed to finish on w1
        assert all(outcomes[i] == "w2" for i in range(10, 16))
        assert gw.roles["gateway"].quota.book.held() == 0
    for n in (gw, w2):
        n.stop()


async def test_a_whole_answer_survives_its_worker_dying_mid_generation(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """Whole-answer requests (``"stream": false``, what ``Client.inference``
    sends) have shown the client nothing until the answer is complete, so
    a worker killed half way through is replaced: every request succeeds on
    the other worker, with its exact token count."""
    gw, w1, w2 = nodes = await gateway_and_two_slow_workers(tmp_path, nursery)
    with trio.fail_after(90):
        creds = await new_user_with_key(gw)
        await gateways_see_workers(nodes, "fake", 2)
        auth = {"api_key": creds["api_key"]}
        trailers: dict[int, Any] = {}

        async def one(i: int) -> None:
            chunks = []
            async with gw.rpc.stream(gw.peer_id, "processInferenceRequest",
                                     {"request": {"prompt": f"q{i}", "model": "fake",
                                                  "stream": False}, "auth": auth}) as s:
                async for chunk in s:
                    chunks.append(chunk)
            assert len(chunks) == 1 and len(chunks[0]["delta"].split()) == 40
            trailers[i] = s.trailer

        router = gw.roles["gateway"].router
        async with trio.open_nursery() as n:
            for i in range(10):
                n.start_soon(one, i)
            await wait_for(lambda: router.stats.get(w1.peer_id) is not None
                           and router.stats[w1.peer_id].in_flight > 0)
            await trio.sleep(0.5)  # w1 is half way through its 2 s answers
            w1.stop()
        assert sorted(trailers) == list(range(10))  # nothing failed, nothing lost
        assert all(t["worker"] == w2.peer_id for t in trailers.values())
        assert all(t["usage"]["completion_tokens"] == 40 for t in trailers.values())
        assert router.stats[w1.peer_id].failures >= 1  # some had been sent to w1
        assert gw.roles["gateway"].quota.book.held() == 0
    for n in (gw, w2):
        n.stop()


async def test_cancelled_requests_leave_no_held_slots(tmp_path: Path,
                                                      nursery: trio.Nursery) -> None:
    """1,000 requests cancelled mid-flight: every quota ticket and every
    inference slot comes back."""
    roles = [["auth", "gateway", "inference"]]
    homes = make_network(tmp_path, ["all"], roles=roles)
    nodes = await start(nursery, homes, roles, tables={
        **synthetic(tokens=1000, token_delay=0.01),
        "gateway": {"concurrent_per_key": 0,
                    "concurrent_per_user": 0, "default_rate_limit": 100_000}})
    (node,) = nodes
    gateway = node.roles["gateway"]
    with trio.fail_after(120):
        creds = await new_user_with_key(node)
        auth = {"api_key": creds["api_key"]}
        streaming = 0

        async def one(i: int) -> None:
            nonlocal streaming
            async with node.rpc.stream(node.peer_id, "processInferenceRequest",
                                       {"request": {"prompt": f"p{i}", "model": "fake"},
                                        "auth": auth}) as s:
                async for _ in s:
                    streaming += 1
                    await trio.sleep_forever()

        async with trio.open_nursery() as n:
            for i in range(1000):
                n.start_soon(one, i)
            await wait_for(lambda: gateway.quota.book.held() == 1000 and streaming >= 500,
                           limit=60)
            n.cancel_scope.cancel()
        await wait_for(lambda: gateway.quota.book.held() == 0 and gateway.in_flight == 0,
                       limit=30)
        engine = node.roles["inference"].engine
        await wait_for(lambda: engine.describe()["in_flight"] == 0, limit=30)
        assert engine.describe()["queue_depth"] == 0
        assert streaming > 0
    node.stop()


def test_relayed_client_source_is_honoured_from_members_only() -> None:
    """The web role relays the HTTP client's address so that key guessing is
    throttled per client; a non-member, or a member without the web or
    gateway grant (a worker), cannot pick its own throttle bucket."""
    from p2pinfer.gateway.role import _source
    from p2pinfer.rpc.server import CallContext

    def ctx(member: bool, grants: frozenset[str] = frozenset({"web"})) -> CallContext:
        return CallContext(peer_id="12D3KooWpeer", method="m", call_id=1, is_member=member,
                           request_id="r", remote_ip="10.0.0.9",
                           grants=grants if member else frozenset())

    relayed = {"source": "ip:192.0.2.7"}
    assert _source(ctx(True), relayed) == "ip:192.0.2.7"
    assert _source(ctx(False), relayed) == "ip:10.0.0.9"
    assert _source(ctx(True, frozenset({"inference"})), relayed) == "ip:10.0.0.9"
    assert _source(ctx(True), {"source": "anything goes"}) == "ip:10.0.0.9"
    assert _source(ctx(True), {}) == "ip:10.0.0.9"
