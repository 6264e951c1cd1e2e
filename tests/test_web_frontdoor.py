"""The web role's front doors: uvicorn processes serving the web app,
reaching the swarm through the node's local socket (``[web] workers``).

Real parts throughout: a node with auth, gateway, inference and web, its
front-door processes, the official openai package, raw HTTP from httpx.
Front doors are what users get by default (``workers = "auto"``), so the
whole web suite runs on them; ``P2PINFER_TEST_WEB_WORKERS=0 pytest
tests/test_web_*.py`` runs it inside the node instead.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from p2pinfer.config import NodeConfig
from p2pinfer.errors import ConfigError
from p2pinfer.web import WebSettings

from .helpers import make_network, node_config, run_nodes, wait_for
from .test_web_support import WebSwarm, web_swarm, web_tables

SLOW = {"name": "slow", "backend": "synthetic", "tokens": 60, "token_delay": 0.1,
        "context_length": 2048}
FRONT_DOORS = {"workers": 2}


@pytest.mark.parametrize("workers", [2, 0], ids=["front_doors", "in_the_node"])
async def test_front_doors_serve_the_openai_package_and_pages(
        tmp_path: Path, nursery: trio.Nursery, workers: int) -> None:
    """The same app, served by front doors (what users get) and inside the
    node (``workers = 0``)."""
    with trio.fail_after(90):
        async with web_swarm(nursery, tmp_path, web={"workers": workers}) as swarm:
            web = swarm.web
            assert len(web.front_doors) == workers
            assert os.getpid() not in web.front_doors.values()
            account = await swarm.account()
            client = openai.AsyncOpenAI(base_url=f"{swarm.url}/v1", api_key=account.api_key,
                                        max_retries=0)
            whole = await client.chat.completions.create(
                model="fake", messages=[{"role": "user", "content": "hello"}])
            assert whole.choices[0].message.content and whole.usage is not None
            pieces = []
            stream = await client.chat.completions.create(
                model="fake", messages=[{"role": "user", "content": "hello"}], stream=True)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
            assert "".join(pieces) == whole.choices[0].message.content
            await client.close()
            async with swarm.client() as http:
                page = await http.get("/login")
                assert page.status_code == 200 and "<form" in page.text
                assert page.headers["x-content-type-options"] == "nosniff"
                assert "server" not in page.headers
                bad = await http.post("/v1/chat/completions", json={"model": "fake"},
                                      headers={"Authorization": f"Bearer {account.api_key}"})
                assert bad.status_code == 400 and bad.json()["error"]["type"]
                anon = await http.get("/api/quota")
                assert anon.status_code == 401
            # every front door's requests reach the node's metrics
            await wait_for(lambda: web_requests(swarm.node) >= 5, limit=10)
            sock = swarm.node.config.home / "run" / "web.sock"
            if workers:
                assert stat.S_IMODE(sock.stat().st_mode) == 0o600
            else:
                assert not sock.exists()


async def test_a_web_only_node_relays_through_its_front_doors(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """A node with only the web role: its front doors reach the swarm's
    auth, gateway and workers through the node's relay (``web.inference``,
    ``web.embed``, ``web.call``): registration, whole and streamed answers,
    an unknown model's 404 and a bad key's 401, each in its dialect."""
    homes = make_network(tmp_path, ["hub", "front"],
                         roles=[["auth", "gateway", "inference"], ["web"]])
    with trio.fail_after(120):
        async with run_nodes(nursery, [node_config(
                homes[0], roles=["auth", "gateway", "inference"],
                tables=web_tables())]) as (hub,):
            await hub.roles["inference"].engine.wait_settled()
            async with run_nodes(nursery, [node_config(
                    homes[1], roles=["web"], bootstrap=[hub.addrs[0]],
                    tables=web_tables(models=None, web=FRONT_DOORS))]) as (front,):
                web = front.roles["web"]
                assert len(web.front_doors) == 2
                swarm = WebSwarm(front, web.url, [hub, front])
                account = await swarm.account()
                client = openai.AsyncOpenAI(base_url=f"{web.url}/v1",
                                            api_key=account.api_key, max_retries=0)
                whole = await client.chat.completions.create(
                    model="fake", messages=[{"role": "user", "content": "hello"}])
                assert whole.choices[0].message.content
                pieces = []
                stream = await client.chat.completions.create(
                    model="fake", messages=[{"role": "user", "content": "hello"}],
                    stream=True)
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        pieces.append(chunk.choices[0].delta.content)
                assert "".join(pieces) == whole.choices[0].message.content
                with pytest.raises(openai.NotFoundError):
                    await client.chat.completions.create(
                        model="nothing", messages=[{"role": "user", "content": "hi"}])
                await client.close()
                async with swarm.client() as http:
                    r = await http.post("/api/chat", json={
                        "model": "fake", "stream": False,
                        "messages": [{"role": "user", "content": "hi"}]},
                        headers={"Authorization": f"Bearer {account.api_key}"})
                    assert r.status_code == 200 and r.json()["message"]["content"], r.text
                    r = await http.post("/api/chat", json={
                        "model": "fake", "messages": [{"role": "user", "content": "hi"}]},
                        headers={"Authorization": "Bearer p2p_aaaaaaaaaaaa_" + "b" * 43})
                    assert r.status_code == 401 and "error" in r.json(), r.text
                    r = await http.get("/api/usage", headers=account.key_headers)
                    assert r.status_code == 200, r.text


def web_requests(node: Any) -> float:
    total = 0.0
    for metric in node.registry.collect():
        for sample in metric.samples:
            if sample.name == "ai_platform_requests_total" and sample.labels.get(
                    "service") == "web":
                total += sample.value
    return total


async def test_a_client_that_goes_away_cancels_its_request_at_once(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """60 tokens at 0.1 s each: the client reads two chunks and hangs up;
    the worker's slot is free again within a second, not after 6 s."""
    with trio.fail_after(90):
        async with web_swarm(nursery, tmp_path, web=FRONT_DOORS, models=(SLOW,)) as swarm:
            account = await swarm.account()
            engine = swarm.node.roles["inference"].engine
            free = engine.status("slow")["free_slots"]
            async with swarm.client() as http:
                async with http.stream("POST", "/v1/chat/completions", json={
                        "model": "slow", "stream": True,
                        "messages": [{"role": "user", "content": "count"}]},
                        headers={"Authorization": f"Bearer {account.api_key}"}) as r:
                    assert r.status_code == 200
                    seen = 0
                    async for line in r.aiter_lines():
                        seen += line.startswith("data: ")
                        if seen >= 2:
                            break
                    assert engine.status("slow")["free_slots"] == free - 1
                hung_up = trio.current_time()
            await wait_for(lambda: engine.status("slow")["free_slots"] == free, limit=5)
            assert trio.current_time() - hung_up < 1.5


async def test_a_front_door_that_dies_is_started_again(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(90):
        async with web_swarm(nursery, tmp_path, web=FRONT_DOORS) as swarm:
            web = swarm.web
            account = await swarm.account()
            victim = web.front_doors[0]
            os.kill(victim, signal.SIGKILL)
            await wait_for(lambda: web.restarts == 1 and web.front_doors.get(0) not in
                           (None, victim), limit=15)
            async with swarm.client() as http:
                for _ in range(10):  # whichever process takes the connection
                    r = await http.post("/v1/chat/completions", json={
                        "model": "fake", "messages": [{"role": "user", "content": "hi"}]},
                        headers={"Authorization": f"Bearer {account.api_key}",
                                 "Connection": "close"})
                    assert r.status_code == 200, r.text


async def test_the_front_doors_stop_with_the_node(tmp_path: Path,
                                                  nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        async with web_swarm(nursery, tmp_path, web=FRONT_DOORS) as swarm:
            pids = list(swarm.web.front_doors.values())
            url = swarm.url
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                await trio.sleep(0.05)
            raise AssertionError(f"front door {pid} still runs")
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"{url}/api/health", timeout=2)


def test_workers_setting(tmp_path: Path) -> None:
    def settings(**web: Any) -> WebSettings:
        return WebSettings.from_config(NodeConfig.from_mapping(
            {"node": {"home": str(tmp_path)}, "web": web}, env={}))

    from p2pinfer.web.settings import MAX_AUTO_WORKERS, auto_workers

    cores = len(os.sched_getaffinity(0))
    assert settings().workers == min(cores, MAX_AUTO_WORKERS) == auto_workers()
    assert settings(workers="auto").workers == settings(workers=" AUTO ").workers == \
        auto_workers()
    assert settings(workers=0).workers == 0 and settings(workers=4).workers == 4
    env = NodeConfig.from_mapping({"node": {"home": str(tmp_path)}},
                                  env={"P2PINFER_WEB_WORKERS": "3"})
    assert WebSettings.from_config(env).workers == 3
    env = NodeConfig.from_mapping({"node": {"home": str(tmp_path)}},
                                  env={"P2PINFER_WEB_WORKERS": "auto"})
    assert WebSettings.from_config(env).workers == auto_workers()
    for bad in (-1, 65, "many", "", 1.5, True):
        with pytest.raises(ConfigError, match="web.workers"):
            settings(workers=bad)


async def test_a_listed_model_costs_no_credential_check_and_an_unlisted_one_does() -> None:
    """The hot path: a model in the list cached within its ttl is resolved
    without a call (the gateway checks the credential with the request);
    a name not in it is looked up only after the credential is checked, so
    a caller without one learns nothing about the swarm's models."""
    from p2pinfer.errors import InvalidApiKey, UnknownModel
    from p2pinfer.web.upstream import ModelCatalog

    class Listing:
        checks = 0
        lists = 0
        valid = True

        async def authenticate(self, auth: dict[str, str]) -> None:
            self.checks += 1
            if not self.valid:
                raise InvalidApiKey("no", data={"reason": "unknown"})

        async def call(self, role: str, method: str, params: Any = None, *,
                       long: bool = False) -> Any:
            self.lists += 1
            return {"models": [{"name": "fake", "aliases": ["f"]}]}

    listing = Listing()
    catalog = ModelCatalog(listing, 60.0)  # type: ignore[arg-type]
    auth = {"api_key": "p2p_x"}
    assert await catalog.resolve("fake", auth) == "fake"  # cold: checked and listed
    assert (listing.checks, listing.lists) == (1, 1)
    for name, expected in (("fake", "fake"), ("f", "f"), ("fake:latest", "fake")):
        assert await catalog.resolve(name, auth) == expected
    assert (listing.checks, listing.lists) == (1, 1)
    listing.valid = False
    assert await catalog.resolve("fake", auth) == "fake"  # the gateway will refuse it
    with pytest.raises(InvalidApiKey):
        await catalog.resolve("other", auth)  # not "no such model"
    listing.valid = True
    with pytest.raises(UnknownModel):
        await catalog.resolve("other", auth)


async def test_a_model_that_just_appeared_is_found_though_the_timer_wakes_early(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A name missing from a list fetched a moment ago is asked for again
    after the half-second limit, even when the event loop's timer wakes the
    waiting request a little early (uvloop's timers have millisecond
    steps; the stale list once answered 404 for a model just loaded)."""
    import anyio

    from p2pinfer.web import upstream as upstream_module
    from p2pinfer.web.upstream import ModelCatalog

    class Growing:
        lists = 0

        async def authenticate(self, auth: dict[str, str]) -> None:
            return None

        async def call(self, role: str, method: str, params: Any = None, *,
                       long: bool = False) -> Any:
            self.lists += 1
            names = ["fake"] if self.lists == 1 else ["fake", "relay"]
            return {"models": [{"name": n} for n in names]}

    real_sleep = anyio.sleep

    async def early(seconds: float) -> None:
        await real_sleep(max(0.0, seconds - 0.002))

    monkeypatch.setattr(upstream_module.anyio, "sleep", early)
    listing = Growing()
    catalog = ModelCatalog(listing, 60.0)  # type: ignore[arg-type]
    auth = {"api_key": "p2p_x"}
    assert await catalog.resolve("fake", auth) == "fake"
    assert await catalog.resolve("relay", auth) == "relay"
    assert listing.lists == 2


async def test_a_model_no_worker_serves_is_404_and_a_busy_one_is_not() -> None:
    """What both upstreams (in the node, in a front door) make of a
    gateway's NoWorkerAvailable: UnknownModel when no worker in the swarm
    serves the model at all, the busy error otherwise."""
    from p2pinfer.errors import NoWorkerAvailable, UnknownModel
    from p2pinfer.web.upstream import ModelCatalog

    class Listing:  # the part of WebUpstream the catalog uses
        asked = 0

        async def authenticate(self, auth: dict[str, str]) -> None:
            return None

        async def call(self, role: str, method: str, params: Any = None, *,
                       long: bool = False) -> Any:
            self.asked += 1
            return {"models": [{"name": "fake", "aliases": ["f"]}]}

    listing = Listing()
    catalog = ModelCatalog(listing, 2.0)  # type: ignore[arg-type]
    auth = {"api_key": "p2p_x"}
    with pytest.raises(UnknownModel) as gone:
        await catalog.check_served(NoWorkerAvailable("busy", data={"model": "gone"}), auth)
    assert gone.value.data == {"model": "gone"}
    await catalog.check_served(NoWorkerAvailable("busy", data={"model": "fake"}), auth)
    assert listing.asked == 2  # asked afresh each time


def test_the_indexed_router_picks_the_route_starlettes_would() -> None:
    """Every request to a fixed path, with each method any route takes,
    reaches the route Starlette's own search finds first (or the same
    fallback: 405, 404), and the hot routes are indexed."""
    from starlette.routing import Match, Route

    from p2pinfer.web.app import IndexedRouter
    from p2pinfer.web.site import WebSite

    site = WebSite(WebSettings.from_config(NodeConfig.from_mapping({}, env={})),
                   upstream=None,  # type: ignore[arg-type]  # routing only
                   peer_id="12D3KooWtest", metrics=None,  # type: ignore[arg-type]
                   csrf_key=b"k" * 32, tls=False)
    app = site.app
    while not hasattr(app, "router"):
        app = app.app
    router = app.router
    assert isinstance(router, IndexedRouter)
    for hot in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/api/chat",
                "/api/generate", "/api/embed", "/api/inference", "/v1/responses"):
        assert hot in router.exact, hot
    methods = sorted({m for r in router.routes if isinstance(r, Route) for m in r.methods or ()})
    paths = {r.path for r in router.routes if isinstance(r, Route)} | {"/nowhere"}
    checked = 0
    for path in sorted(paths):
        for method in methods:
            scope = {"type": "http", "path": path, "root_path": "", "method": method}
            first = next((r for r in router.routes
                          if r.matches(scope)[0] is Match.FULL), None)
            indexed = next((r for r in router.exact.get(path, ())
                            if r.matches(scope)[0] is Match.FULL), None)
            if indexed is not None:  # the index answers: it must be Starlette's choice
                assert indexed is first, (method, path)
                checked += 1
            else:  # Starlette's own search answers (405, 404, a path route)
                assert path not in router.exact or first is None or first not in \
                    router.exact[path], (method, path)
    assert checked >= 40
    # the control: a fixed path an earlier route with a parameter takes is
    # left to Starlette's search
    async def endpoint(request: Any) -> Any:
        raise AssertionError("not called")

    shadowing = Route("/a/{x}", endpoint, methods=["GET"])
    shadowed = IndexedRouter([shadowing, Route("/a/b", endpoint, methods=["GET"]),
                              Route("/c", endpoint, methods=["GET"])])
    assert set(shadowed.exact) == {"/c"}
