"""The inference role over RPC between two real libp2p hosts on loopback:
streaming on the real model, catalog, status, errors, overload, cancellation,
metrics, and the role inside a real Node."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx2
import msgpack
import multiaddr
import pytest
import trio

from p2pinfer import errors
from p2pinfer.config import NodeConfig
from p2pinfer.identity import Identity
from p2pinfer.inference import InferenceRole
from p2pinfer.rpc import RPC_PROTOCOL, RpcClient, RpcServer, make_host
from p2pinfer.rpc.host import guard_handler
from p2pinfer.testing import FakeContext

from .helpers import node_config, run_nodes, wait_for

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
STORY = "Write a short story about a robot."


def make_role(tables: dict[str, Any] | None = None, **kwargs: Any) -> InferenceRole:
    """The role on a node-less RoleContext (config, registry, invalidations)."""
    config = NodeConfig.from_mapping({"node": {"home": "/tmp/unused"}, **(tables or {})},
                                     env={})
    return InferenceRole(FakeContext(config), **kwargs)


@asynccontextmanager
async def serve(role: InferenceRole, *, member: bool = True
                ) -> AsyncIterator[tuple[RpcClient, str]]:
    """``role`` on an RpcServer on one host, an RpcClient on another."""
    server = RpcServer(is_member=lambda peer: member)
    server.register(role)
    server_host = make_host(Identity.generate())
    client_host = make_host(Identity.generate())
    async with server_host.run(listen_addrs=LOOPBACK), client_host.run(listen_addrs=LOOPBACK):
        server_host.set_stream_handler(RPC_PROTOCOL, guard_handler("rpc", server.handle_stream))
        async with trio.open_nursery() as nursery:
            await nursery.start(role.run)
            async with RpcClient.open(client_host) as client:
                peer = await client.connect(str(server_host.get_addrs()[0]))
                yield client, peer
            nursery.cancel_scope.cancel()


async def prompt(client: RpcClient, peer: str, params: Any,
                 arrivals: list[float] | None = None) -> tuple[list[Any], Any]:
    chunks = []
    async with client.stream(peer, "processPrompt", params) as stream:
        async for chunk in stream:
            if arrivals is not None:
                arrivals.append(trio.current_time())
            chunks.append(chunk)
    return chunks, stream.trailer


def sample(role: InferenceRole, name: str, labels: dict[str, str]) -> float | None:
    assert role.metrics is not None
    return role.metrics.registry.get_sample_value(name, labels)


# -- the real embedded model, end to end over RPC ----------------------------------------------
async def test_process_prompt_streams_the_real_model_over_rpc() -> None:
    role = make_role()
    async with serve(role) as (client, peer):
        with trio.fail_after(90):
            await role.engine.wait_settled()
            arrivals: list[float] = []
            # 64 tokens: ~0.6 s here, so ~12 chunks of the runner's 50 ms
            params = {"prompt": STORY, "max_tokens": 64, "temperature": 0}
            chunks, trailer = await prompt(client, peer, params, arrivals)
            ended = trio.current_time()
            again, cached = await prompt(client, peer, {**params, "model": "default"})
            fresh, uncached = await prompt(client, peer, {**params, "cache": False,
                                                          "model": "smollm2-135m"})
    assert all(set(c) == {"delta"} and isinstance(c["delta"], str) for c in chunks)
    text = "".join(c["delta"] for c in chunks)
    assert text.startswith("In the year")
    # Chunks arrive one by one while the model generates, before the call ends.
    # (A consumer that falls behind gets the waiting tokens merged into one chunk.)
    assert len(chunks) >= 8 and ended - arrivals[0] > 0.1
    assert arrivals == sorted(arrivals)
    assert trailer["model"] == "smollm2" and trailer["backend"] == "llamacpp"
    assert trailer["finish_reason"] == "length" and trailer["cached"] is False
    assert trailer["usage"]["completion_tokens"] == 64
    assert trailer["usage"]["prompt_tokens"] > len(STORY.split())
    assert trailer["usage"]["total_tokens"] == 64 + trailer["usage"]["prompt_tokens"]
    assert trailer["usage_exact"] is True
    assert 0 < trailer["ttft_ms"] <= trailer["latency_ms"]
    # Temperature 0: the cache sends the same answer in one chunk; a fresh run gives the
    # same text.
    assert again == [{"delta": text}] and cached["cached"] is True
    assert cached["usage"] == trailer["usage"] and cached["finish_reason"] == "length"
    assert "".join(c["delta"] for c in fresh) == text and uncached["cached"] is False
    assert sample(role, "ai_platform_inference_tokens_generated_total",
                  {"model": "smollm2"}) == 128
    assert sample(role, "ai_platform_inference_cache_hits_total", {"model": "smollm2"}) == 1
    assert sample(role, "ai_platform_inference_cache_misses_total", {"model": "smollm2"}) == 1
    assert sample(role, "ai_platform_inference_queue_depth", {"model": "smollm2"}) == 0
    assert sample(role, "ai_platform_inference_free_slots", {"model": "smollm2"}) == 2


async def test_a_whole_answer_is_one_chunk_sent_when_complete() -> None:
    """``"stream": false``: the real model's answer comes as a single chunk
    once generation has finished, the same text and usage as when streamed."""
    role = make_role({"inference": {"cache": False}})
    async with serve(role) as (client, peer):
        with trio.fail_after(90):
            await role.engine.wait_settled()
            params = {"prompt": STORY, "max_tokens": 64, "temperature": 0}
            streamed, streamed_trailer = await prompt(client, peer, params)
            arrivals: list[float] = []
            started = trio.current_time()
            whole, trailer = await prompt(client, peer, {**params, "stream": False}, arrivals)
    assert len(streamed) >= 8
    text = "".join(c["delta"] for c in streamed)
    assert whole == [{"delta": text}]
    assert trailer["usage"] == streamed_trailer["usage"] and trailer["cached"] is False
    # nothing arrived before the answer was complete: the one chunk came after
    # the worker's own time to the last token (its latency), not at the first
    assert trailer["latency_ms"] > 2 * trailer["ttft_ms"]  # so the check below can tell
    assert arrivals[0] - started >= trailer["latency_ms"] / 1000 * 0.9


async def test_catalog_status_descriptor_and_topics() -> None:
    role = make_role()
    assert role.topics() == ["model/smollm2", "model/smollm2-135m", "model/default",
                             "model/all-minilm", "model/all-minilm-l6-v2"]
    async with serve(role) as (client, peer):
        with trio.fail_after(60):
            await wait_for(lambda: role.node.invalidated == 1)  # descriptor refreshed on load
            catalog = await client.call(peer, "listAvailableModels")
            status = await client.call(peer, "getModelStatus", "smollm2")
            by_alias = await client.call(peer, "getModelStatus", {"modelId": "default"})
            default = await client.call(peer, "getModelStatus")
            with pytest.raises(errors.UnknownModel) as ei:
                await client.call(peer, "getModelStatus", {"model": "gpt-9"})
            with pytest.raises(errors.InvalidParams):
                await client.call(peer, "getModelStatus", {"name": "smollm2"})
            with pytest.raises(errors.InvalidParams):
                await client.call(peer, "listAvailableModels", {"all": True})
    assert "smollm2" in ei.value.message  # says what the node does serve
    assert catalog["default_model"] == "smollm2"
    model, embedding = catalog["models"]
    assert (embedding["name"], embedding["backend"], embedding["default"]) == (
        "all-minilm", "onnx", False)
    assert model["name"] == "smollm2" and model["backend"] == "llamacpp"
    assert model["aliases"] == ["smollm2-135m", "default"] and model["default"] is True
    assert model["context_length"] == 2048 and model["status"] == "loaded"
    assert status == by_alias == default
    assert status["model"] == "smollm2" and status["status"] == "loaded"
    assert status["slots"] == status["free_slots"] == 2
    assert status["queue_depth"] == status["in_flight"] == 0
    assert status["error"] is None
    described = role.describe()
    msgpack.packb(described)  # fits in a signed descriptor
    # both models' slots: SmolLM2's two and the embedding model's two
    assert described["free_slots"] == 4 and described["queue_depth"] == 0
    assert described["models"][0]["name"] == "smollm2"
    assert set(described["models"][0]) >= {"status", "slots", "free_slots", "in_flight",
                                            "queue_depth", "tok_s", "ttft_ms"}


async def test_only_members_may_call_a_worker() -> None:
    role = make_role({"models": [{"name": "fake", "backend": "synthetic"}]})
    async with serve(role, member=False) as (client, peer):
        with trio.fail_after(20):
            for method in ("listAvailableModels", "getModelStatus"):
                with pytest.raises(errors.NotMember):
                    await client.call(peer, method)
            with pytest.raises(errors.NotMember):
                await prompt(client, peer, "hi")


async def test_invalid_params_name_the_field_over_rpc() -> None:
    role = make_role({"models": [{"name": "fake", "backend": "synthetic"}]})
    async with serve(role) as (client, peer):
        with trio.fail_after(20):
            for params, field in [({"prompt": "x", "temperature": 3}, "temperature"),
                                  ({"messages": [{"role": "x", "content": ""}]},
                                   "messages[0].role"),
                                  ({"prompt": "x", "stop": ["a"] * 9}, "stop"),
                                  ({"prompt": "x", "share": ""}, "share"),
                                  ({"prompt": "x", "share": "s" * 65}, "share"),
                                  ({"prompt": "x", "share": 7}, "share")]:
                with pytest.raises(errors.InvalidParams) as ei:
                    await prompt(client, peer, params)
                assert ei.value.data["field"] == field
            chunks, trailer = await prompt(client, peer, {"prompt": "still here",
                                                          "share": "0123abcd"})
    assert trailer["usage"] == {"prompt_tokens": 5, "completion_tokens": 16,
                                "total_tokens": 21}
    assert len(chunks) == 16


# -- failures: each a specific error, and the worker keeps serving -----------------------
@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting is refused, and no
    other process can take it while the test runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


async def test_each_backend_failure_is_specific_and_the_worker_keeps_serving(
        nursery: trio.Nursery, refused_port: int) -> None:
    mode = {"gpt": "500"}

    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/models"):
            return httpx2.Response(200, json={"data": [{"id": "gpt"}, {"id": "olla"}]})
        if request.url.path == "/api/tags":
            return httpx2.Response(200, json={"models": [{"name": "olla:latest"}]})
        if request.url.path == "/api/show":
            return httpx2.Response(404, json={"error": "not found"})
        if request.url.path == "/api/chat":
            return httpx2.Response(200, content=b'{"message": {"content": "a"}, "done": false}\n'
                                               b'{"message": {"content": "b"}, "done": fal')
        if mode["gpt"] == "500":
            return httpx2.Response(500, json={"error": {"message": "kaboom"}})
        body = (b'data: {"choices": [{"delta": {"content": "ok"}, "finish_reason": "stop"}]}'
                b"\n\ndata: [DONE]\n\n")
        return httpx2.Response(200, content=body)

    async def hang(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, hang, 0, host="127.0.0.1"))
    silent = listeners[0].socket.getsockname()[1]
    role = make_role({
        "inference": {"probe_interval": 3600},
        "models": [
            {"name": "fake", "backend": "synthetic", "tokens": 3},
            {"name": "gpt", "backend": "openai", "url": "https://api.example.test/v1"},
            {"name": "olla", "backend": "ollama", "url": "http://ollama.test:11434"},
            {"name": "down", "backend": "openai", "url": f"http://127.0.0.1:{refused_port}/v1"},
            {"name": "slow", "backend": "ollama", "url": f"http://127.0.0.1:{silent}",
             "timeout": 0.3},
        ]}, http_transport=httpx2.MockTransport(handler))
    # The MockTransport replaces the network for every HTTP backend; the
    # real-socket ones get their own transports back.
    for name in ("down", "slow"):
        role.engine.models[name].backend._transport = None  # type: ignore[attr-defined]

    async def fake_still_works() -> None:
        chunks, trailer = await prompt(client, peer, {"model": "fake", "prompt": "hi"})
        assert len(chunks) == 3 and trailer["finish_reason"] == "stop"

    async with serve(role) as (client, peer):
        with trio.fail_after(30):
            cases: list[tuple[str, type[errors.P2PInferError]]] = [
                ("gpt", errors.BackendError),                  # HTTP 500
                ("olla", errors.MalformedBackendResponse),     # truncated NDJSON
                ("down", errors.BackendUnavailable),           # connection refused
                ("slow", errors.BackendTimeout),               # no answer within 0.3 s
                ("nope", errors.UnknownModel),                 # not served here
            ]
            for model, error in cases:
                with pytest.raises(error):
                    await prompt(client, peer, {"model": model, "prompt": "hi"})
                await fake_still_works()
            # The failing backend itself serves again once its server recovers.
            mode["gpt"] = "ok"
            chunks, trailer = await prompt(client, peer, {"model": "gpt", "prompt": "hi"})
            assert chunks == [{"delta": "ok"}] and trailer["usage_exact"] is False
            statuses = {m["name"]: m["status"] for m in
                        (await client.call(peer, "listAvailableModels"))["models"]}
    assert statuses["down"] == "error" and statuses["fake"] == statuses["gpt"] == "loaded"
    assert sample(role, "ai_platform_inference_requests_total",
                  {"model": "_unknown", "status": "error"}) == 1
    for name in ("gpt", "olla", "down", "slow"):
        assert role.engine.status(name)["free_slots"] == role.engine.models[name].slots


# -- load: overload and cancellation -------------------------------------------------------------
async def test_a_full_queue_is_overloaded_with_a_retry_hint() -> None:
    role = make_role({"models": [{"name": "fake", "backend": "synthetic", "slots": 1,
                                  "max_queue": 2, "tokens": 10, "token_delay": 0.03}]})
    results: list[Any] = []

    async def one() -> None:
        results.append(await prompt(client, peer, {"prompt": "hi", "cache": False}))

    async with serve(role) as (client, peer):
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(one)
                await wait_for(lambda: role.engine.status("fake")["queue_depth"] == 2
                               and role.engine.status("fake")["in_flight"] == 1)
                with pytest.raises(errors.Overloaded) as ei:
                    await prompt(client, peer, {"prompt": "one too many"})
            status = await client.call(peer, "getModelStatus", "fake")
    assert len(results) == 3
    assert 0.05 <= ei.value.retry_after <= 60 and ei.value.data["model"] == "fake"
    assert status["requests"]["overloaded"] == 1 and status["requests"]["success"] == 3
    assert status["queue_depth"] == 0 and status["free_slots"] == 1
    assert sample(role, "ai_platform_inference_requests_total",
                  {"model": "fake", "status": "overloaded"}) == 1


async def test_cancelling_100_queued_and_running_requests_frees_every_slot() -> None:
    role = make_role({"inference": {"max_queue": 200}})
    model = role.engine.models["smollm2"]
    backend: Any = model.backend
    async with serve(role) as (client, peer):
        with trio.fail_after(90):
            await role.engine.wait_settled()
            async with trio.open_nursery() as callers:
                for i in range(100):
                    callers.start_soon(prompt, client, peer,
                                       {"prompt": f"Tell me a long story number {i}.",
                                        "max_tokens": 500})
                await wait_for(lambda: model.in_flight == 2 and model.waiting == 98, limit=30)
                await wait_for(lambda: backend._session.active == 2, limit=30)  # in the runner
                callers.cancel_scope.cancel()
            cancelled_at = trio.current_time()
            await wait_for(lambda: model.free_slots == 2 and model.waiting == 0
                           and backend._session.active == 0, limit=5, interval=0.005)
            freed_in = trio.current_time() - cancelled_at
            status = await client.call(peer, "getModelStatus", "smollm2")
            chunks, trailer = await prompt(client, peer, {"prompt": "Say hi", "max_tokens": 3})
    assert status["free_slots"] == 2 and status["queue_depth"] == status["in_flight"] == 0
    assert status["requests"]["cancelled"] == 100 and status["requests"]["success"] == 0
    assert freed_in < 1.0, freed_in
    assert trailer["usage"]["completion_tokens"] == 3


async def test_a_caller_deadline_stops_generation_on_the_worker() -> None:
    role = make_role()
    model = role.engine.models["smollm2"]
    async with serve(role) as (client, peer):
        with trio.fail_after(60):
            await role.engine.wait_settled()
            got: list[Any] = []
            # temperature 0: the same long answer every time (a sampled one
            # could end on its own before the deadline, and nothing would be
            # cancelled)
            with trio.move_on_after(0.8) as deadline:
                async with client.stream(peer, "processPrompt", {
                        "prompt": "Write a very long story.", "max_tokens": 1500,
                        "temperature": 0}) as stream:
                    async for chunk in stream:
                        got.append(chunk)
            assert deadline.cancelled_caught and stream.trailer is None
            await wait_for(lambda: model.free_slots == 2, limit=2, interval=0.005)
    assert got and model.outcomes["cancelled"] == 1


# -- inside a real Node ---------------------------------------------------------------------------
async def test_the_node_runs_the_role_and_publishes_models(tmp_path: Path,
                                                          nursery: trio.Nursery) -> None:
    config = node_config(tmp_path / "n1", roles=["inference"],
                         tables={"models": [{"name": "fake", "backend": "synthetic",
                                             "aliases": ["f"]}]})
    with trio.fail_after(30):
        async with run_nodes(nursery, [config]) as (node,):
            role = node.roles["inference"]
            assert isinstance(role, InferenceRole)
            assert {"processPrompt", "listAvailableModels", "getModelStatus"} <= set(
                node.rpc_server.methods)
            assert "model/fake" in node.topics() and "model/f" in node.topics()
            descriptor = node.descriptor()
    info = json.loads(json.dumps(descriptor.info, default=str))
    assert info["inference"]["models"][0]["name"] == "fake"
    assert info["inference"]["models"][0]["status"] == "loaded"
