"""The Python SDK (p2pinfer.client) against real nodes: the async Client over
libp2p and over HTTP, SyncClient from plain code and from inside a running
asyncio program, error classes, streaming and cancellation.

:class:`BackgroundSwarm` (also used by the CLI tests) runs a LocalSwarm in a
thread with its own trio loop, so synchronous code (SyncClient, click's
CliRunner) can talk to it from the test's thread.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import p2pinfer
from p2pinfer import client as client_module
from p2pinfer import errors
from p2pinfer.client import Client, SyncClient

from .helpers import wait_for

PASSWORD = "correct horse battery 9"
FAKE = "fake"
HUB_ROLES = ["auth", "gateway", "metrics", "web"]


def synthetic(tokens: int = 6, token_delay: float = 0.0) -> dict[str, Any]:
    """A worker model table: the synthetic backend, also the default model."""
    return {"models": [{"name": FAKE, "backend": "synthetic", "tokens": tokens,
                        "token_delay": token_delay, "aliases": ["default"]}]}


class BackgroundSwarm:
    """A hub (auth, gateway, metrics, web) and synthetic workers, run by a
    LocalSwarm in a background thread (see the module docstring)."""

    def __init__(self, base: Path, *, workers: int = 1, tokens: int = 6,
                 token_delay: float = 0.0, rate_limit: int = 100,
                 extra: dict[str, Any] | None = None) -> None:
        self.base = base
        self.layout: dict[str, list[str]] = {"hub": list(HUB_ROLES)}
        for i in range(1, workers + 1):
            self.layout[f"worker-{i}"] = ["inference"]
        self.tables: dict[str, Any] = {
            **synthetic(tokens, token_delay),
            "auth": {"registration_wait": 0},
            "gateway": {"default_rate_limit": rate_limit},
            "web": {"port": 0},
            "metrics": {"prometheus_port": 0, "interval": 1.0},
            "node": {"announce_interval": 1.0, "descriptor_ttl": 1.0},
            **(extra or {}),
        }
        self.swarm: Any = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, limit: float = 60.0) -> BackgroundSwarm:
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        if not self._ready.wait(limit):
            raise AssertionError("the background swarm did not start in time")
        if self._error is not None:
            raise self._error
        return self

    async def _main(self) -> None:
        from p2pinfer.swarm import LocalSwarm

        try:
            async with LocalSwarm(self.base, self.layout, tables=self.tables) as swarm:
                self.swarm = swarm
                self._token = trio.lowlevel.current_trio_token()
                self._stop = trio.Event()
                with trio.fail_after(60):
                    await self._wait_workers(len(self.layout) - 1)
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _wait_workers(self, n: int) -> None:
        gateway = self.hub.roles["gateway"]
        while True:
            models = {m["name"]: m["workers"] for m in await gateway.swarm_models()}
            if models.get(FAKE, 0) >= n:
                return
            await trio.sleep(0.05)

    def stop(self) -> None:
        if self._stop is not None and self._token is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- access -------------------------------------------------------------------------
    @property
    def hub(self) -> Any:
        return self.swarm.first

    @property
    def addr(self) -> str:
        return str(self.hub.addrs[0])

    @property
    def url(self) -> str:
        return str(self.hub.roles["web"].url)

    @property
    def home(self) -> Path:
        return self.base / "hub"

    def run(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run ``await fn(*args)`` in the swarm's trio loop."""
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def call(self, method: str, params: Any = None) -> Any:
        """An RPC call on the hub, from the hub itself."""
        hub = self.hub
        return self.run(hub.rpc.call, hub.peer_id, method, params)

    def account(self, name: str, *, key: bool = True) -> dict[str, Any]:
        """Register ``name``, log in and (by default) issue an API key (from a
        thread: ``await trio.to_thread.run_sync(swarm.account, name)`` in a trio test)."""
        user = self.call("registerUser", {"username": name, "email": f"{name}@example.com",
                                          "password": PASSWORD})
        session = self.call("loginUser", {"username": name, "password": PASSWORD})
        out = {"user_id": user["user_id"], "username": name, "password": PASSWORD,
               "token": session["token"], "refresh_token": session["refresh_token"],
               "expires_at": session["expires_at"]}
        if key:
            issued = self.call("generateApiKey", {"token": session["token"], "name": "test"})
            out.update(api_key=issued["api_key"], key_id=issued["key_id"])
        return out


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSwarm]:
    bg = BackgroundSwarm(tmp_path_factory.mktemp("sdk-swarm"), tokens=6, rate_limit=5).start()
    try:
        yield bg
    finally:
        bg.stop()


# -- the async client, peer-to-peer ------------------------------------------------------------
async def test_account_flow_and_inference_over_libp2p(swarm: BackgroundSwarm) -> None:
    with trio.fail_after(30):
        async with Client(bootstrap=[swarm.addr]) as client:
            user = await client.register("sdkuser", "sdkuser@example.com", PASSWORD)
            assert user["username"] == "sdkuser" and "password_hash" not in user
            with pytest.raises(errors.InvalidCredentials):
                await client.login("sdkuser", password="not the password 1")
            session = await client.login("sdkuser", password=PASSWORD)
            assert client.token == session["token"]
            assert (await client.me())["user_id"] == user["user_id"]
            issued = await client.create_api_key("laptop")
            assert issued["api_key"].startswith("p2p_") and issued["name"] == "laptop"
            assert [k["key_id"] for k in await client.api_keys()] == [issued["key_id"]]
            rotated = await client.refresh(session["refresh_token"])
            assert rotated["token"] != session["token"] and client.token == rotated["token"]

        async with Client(bootstrap=[swarm.addr], api_key=issued["api_key"]) as client:
            arrived: list[str] = []
            async with client.stream("Write a poem", model=FAKE) as stream:
                async for delta in stream:
                    arrived.append(delta)
            assert stream.response is not None and len(arrived) >= 1
            assert stream.response.text == "".join(arrived)
            assert len(stream.response.text.split()) == 6
            assert stream.response.usage["completion_tokens"] == 6
            assert stream.response.worker == swarm.swarm.nodes["worker-1"].peer_id
            again = await client.inference("Write a poem", model=FAKE, max_tokens=2)
            assert again.usage["completion_tokens"] == 2 and again.finish_reason == "length"
            assert [m["name"] for m in await client.models()] == [FAKE]
            quota = await client.quota()
            assert quota["usage"]["requests"] == 2 and quota["limits"]["requests"] == 5
            health = await client.health()
            assert health["status"] == "ok" and FAKE in health["models"]
            system = await client.system_health()
            assert system["status"] in ("ok", "degraded", "critical")
            assert system["summary"]["nodes"] >= 1 and "nodes" not in system  # redacted
            peers = await client.peers()
            assert [p["peer_id"] for p in peers] == [swarm.hub.peer_id]  # entry points only
            with pytest.raises(errors.AuthenticationRequired):
                await client.create_api_key("needs a session")

        async with Client(bootstrap=[swarm.addr], token=rotated["token"]) as client:
            await client.revoke_api_key(issued["key_id"])
            await client.logout()
            assert client.token is None
        async with Client(bootstrap=[swarm.addr], api_key=issued["api_key"]) as client:
            with pytest.raises(errors.RevokedApiKey):
                await client.inference("hi", model=FAKE)
        async with Client(bootstrap=[swarm.addr], token=rotated["token"]) as client:
            with pytest.raises(errors.TokenRevoked):
                await client.me()


async def test_errors_leave_async_with_as_themselves(swarm: BackgroundSwarm) -> None:
    """A nursery inside the client must not turn errors into ExceptionGroups."""
    with trio.fail_after(30):
        with pytest.raises(errors.InvalidApiKey):
            async with Client(bootstrap=[swarm.addr], api_key="p2p_not_a_key") as client:
                await client.inference("hi")
        peer = swarm.addr.rsplit("/p2p/", 1)[1]
        with pytest.raises(errors.PeerUnavailable, match="cannot reach any bootstrap node"):
            async with Client(bootstrap=[f"/ip4/127.0.0.1/tcp/1/p2p/{peer}"],
                              api_key="p2p_x") as client:
                await client.models()
        with pytest.raises(errors.NoWorkerAvailable, match="no-such-model"):
            alice = await trio.to_thread.run_sync(swarm.account, "unknownmodel")
            async with Client(bootstrap=[swarm.addr], api_key=alice["api_key"]) as client:
                await client.inference("hi", model="no-such-model")


async def test_rate_limit_is_a_rate_limited_error(swarm: BackgroundSwarm) -> None:
    bob = await trio.to_thread.run_sync(swarm.account, "ratelimited")
    with trio.fail_after(30):
        async with Client(bootstrap=[swarm.addr], api_key=bob["api_key"]) as client:
            for _ in range(5):
                await client.inference("hi", model=FAKE)
            with pytest.raises(errors.RateLimited) as info:
                await client.inference("hi", model=FAKE)
            assert info.value.retry_after is not None and info.value.retry_after > 0


def test_a_client_needs_an_address_and_prompt_xor_messages(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("P2PINFER_URL", raising=False)
    with pytest.raises(errors.ConfigError):
        Client()
    monkeypatch.setenv("P2PINFER_BOOTSTRAP", "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWabc, "
                                             "/ip4/127.0.0.1/tcp/4002/p2p/12D3KooWdef")
    monkeypatch.setenv("P2PINFER_API_KEY", "p2p_from_env")
    c = Client()
    assert len(c.bootstrap) == 2 and c.api_key == "p2p_from_env" and not c.is_http
    assert Client(base_url="http://gw:3000").is_http  # an explicit URL wins over the env
    with pytest.raises(errors.InvalidParams):
        c.stream()
    with pytest.raises(errors.InvalidParams):
        c.stream("a", messages=[{"role": "user", "content": "b"}])


# -- HTTP mode ---------------------------------------------------------------------------------
async def test_the_same_calls_over_http(swarm: BackgroundSwarm) -> None:
    with trio.fail_after(30):
        async with Client(base_url=swarm.url) as client:
            await client.register("httpuser", "httpuser@example.com", PASSWORD)
            with pytest.raises(errors.InvalidCredentials):
                await client.login("httpuser", password="not the password 1")
            session = await client.login(email="httpuser@example.com", password=PASSWORD)
            issued = await client.create_api_key("http")
            assert (await client.me())["username"] == "httpuser"
            await client.logout()
            with pytest.raises(errors.TokenRevoked):
                await client.refresh(session["refresh_token"])
        async with Client(base_url=swarm.url, api_key=issued["api_key"]) as client:
            parts = []
            async with client.stream("Hello", model=FAKE) as stream:
                async for delta in stream:
                    parts.append(delta)
            assert stream.response is not None and stream.response.text == "".join(parts)
            assert len(stream.response.text.split()) == 6
            assert stream.response.usage["completion_tokens"] == 6
            assert [k["name"] for k in await client.api_keys()] == ["http"]
            assert (await client.health())["web"]["peer_id"] == swarm.hub.peer_id
            with pytest.raises(errors.UnknownMethod):
                await client.system_health()
            with pytest.raises(errors.ConfigError):
                await client.peers()
    with pytest.raises(errors.PeerUnavailable):
        async with Client(base_url="http://127.0.0.1:1", api_key="p2p_x") as client:
            await client.models()


async def test_http_errors_rebuild_the_error_class() -> None:
    """The HTTP transport maps the web role's error body (and a bad body)."""
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/quota":
            return httpx.Response(429, json={"error": {
                "code": 1601, "type": "RateLimited", "message": "slow down",
                "data": {"retry_after": 7}}})
        return httpx.Response(502, text="<html>bad gateway</html>")

    async with Client(base_url="http://web.test", api_key="p2p_x",
                      transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(errors.RateLimited) as info:
            await client.quota()
        assert info.value.retry_after == 7 and info.value.data["http_status"] == 429
        with pytest.raises(errors.P2PInferError, match="HTTP 502"):
            await client.models()


# -- SyncClient --------------------------------------------------------------------------------
def test_sync_client_from_plain_code_streams_as_tokens_arrive(tmp_path: Path) -> None:
    slow = BackgroundSwarm(tmp_path / "slow", tokens=5, token_delay=0.2).start()
    try:
        user = slow.account("syncuser")
        with SyncClient(bootstrap=[slow.addr], api_key=user["api_key"]) as client:
            arrivals = []
            stream = client.stream("Tell me a story", model=FAKE)
            for _ in stream:
                arrivals.append(time.monotonic())
            assert stream.response is not None and len(arrivals) == 5
            assert arrivals[-1] - arrivals[0] >= 0.6  # not collected before the first one
            # closing a stream early cancels the request on the gateway
            stream = client.stream("Another story", model=FAKE)
            next(iter(stream))
            stream.close()
            gateway = slow.hub.roles["gateway"]

            slow.run(wait_for, lambda: gateway.in_flight == 0)
            ledger = slow.hub.ledger
            logs = slow.run(wait_for, lambda: [r.status for r in ledger.request_logs(
                user_id=user["user_id"]) if r.status != "success"])
            assert logs == ["cancelled"]
            assert client.run(lambda c: c.models())[0]["name"] == FAKE
            with pytest.raises(errors.NoWorkerAvailable):
                client.inference("hi", model="nope")
    finally:
        slow.stop()


def test_sync_client_inside_a_running_asyncio_program(swarm: BackgroundSwarm) -> None:
    user = swarm.account("asynciouser")

    async def main() -> dict[str, Any]:
        ticks = 0

        async def heartbeat() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        beat = asyncio.create_task(heartbeat())
        with SyncClient(bootstrap=[swarm.addr], api_key=user["api_key"]) as client:
            direct = client.inference("From asyncio", model=FAKE)  # blocks the loop: allowed
            before = ticks
            threaded = await asyncio.to_thread(client.inference, "From a thread", model=FAKE)
            during = ticks - before
            streamed = await asyncio.to_thread(lambda: list(client.stream("Hi", model=FAKE)))
            with pytest.raises(errors.NoWorkerAvailable):
                await asyncio.to_thread(client.inference, "x", model="nope")
        beat.cancel()
        return {"direct": direct, "threaded": threaded, "during": during,
                "streamed": streamed}

    out = asyncio.run(main())
    assert out["direct"].usage["completion_tokens"] == 6
    assert out["threaded"].usage["completion_tokens"] == 6
    assert out["during"] >= 1  # the asyncio loop kept running during the call
    assert len("".join(out["streamed"]).split()) == 6


async def test_wait_for_model_returns_the_served_entry(swarm: BackgroundSwarm) -> None:
    user = await trio.to_thread.run_sync(swarm.account, "waiter")
    async with Client(bootstrap=[swarm.addr], api_key=user["api_key"]) as client:
        with trio.fail_after(10):
            entry = await client.wait_for_model(FAKE)
            assert entry["name"] == FAKE and entry["status"] == "loaded"
            assert (await client.wait_for_model())["name"] == FAKE  # any model
        with pytest.raises(trio.TooSlowError):  # bounded by the caller, trio style
            with trio.fail_after(0.6):
                await client.wait_for_model(FAKE, workers=99)
        for bad in (0, -1, 1.5, True):
            with pytest.raises(errors.InvalidParams):
                await client.wait_for_model(FAKE, workers=bad)  # type: ignore[arg-type]


def test_sync_wait_for_model_gives_up_with_a_clear_error(swarm: BackgroundSwarm) -> None:
    user = swarm.account("syncwaiter")
    with SyncClient(bootstrap=[swarm.addr], api_key=user["api_key"]) as client:
        assert client.wait_for_model(FAKE, timeout=10)["name"] == FAKE
        with pytest.raises(errors.NoWorkerAvailable, match="'nope' within 0.5 s"):
            client.wait_for_model("nope", timeout=0.5)
        with pytest.raises(errors.InvalidParams):
            client.wait_for_model(FAKE, timeout=0)


def test_sync_client_open_errors_reach_the_caller() -> None:
    peer = "12D3KooWRHrW7MTBm6CRYPNCx4wSfX1ZY6QikJ73DdNviHTRdfDM"
    client = SyncClient(bootstrap=[f"/ip4/127.0.0.1/tcp/1/p2p/{peer}"], api_key="p2p_x")
    with client, pytest.raises(errors.PeerUnavailable):
        client.models()
    with pytest.raises(errors.ConfigError):
        SyncClient(base_url=None, bootstrap=[]).open()


def test_public_names() -> None:
    assert {"Client", "SyncClient"} <= set(p2pinfer.__all__)
    assert p2pinfer.Client is Client and p2pinfer.SyncClient is SyncClient
    assert sorted(client_module.__all__) == ["Client", "EmbeddingResponse", "InferenceResponse",
                                             "InferenceStream", "SyncClient", "SyncStream"]
    response = client_module.InferenceResponse.from_trailer("hi", {
        "model": "m", "usage": {"total_tokens": 3, "bogus": "x"}, "cached": True})
    assert json.loads(json.dumps(response.to_dict()))["usage"] == {"total_tokens": 3}
