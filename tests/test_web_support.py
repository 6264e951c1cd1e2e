"""What the web tests share: a real node (auth, gateway, inference, web; the
metrics role on request) on loopback with its HTTP server on a free port,
and a user with a session and an API key made through the REST API.

Named ``test_web_*`` to stay with the web tests; the few tests here check
the helpers themselves (the settings the fixtures rely on).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from p2pinfer.errors import ConfigError

from .helpers import make_network, node_config, run_nodes

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
FAKE = {"name": "fake", "backend": "synthetic", "tokens": 6, "context_length": 2048}
PASSWORD = "correct horse battery staple"
# Fast password hashing: these tests are about HTTP, not argon2's cost.
FAST_AUTH = {"argon2_memory_kib": 1024, "argon2_time_cost": 1, "registration_wait": 0}


@dataclass
class Account:
    """A user made through the REST API: its session and one API key."""

    username: str
    user_id: str
    token: str
    refresh_token: str
    api_key: str
    key_id: str

    @property
    def key_headers(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key}

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class WebSwarm:
    """A running node with the web role (and what the test made on it)."""

    node: Any
    url: str
    nodes: list[Any] = field(default_factory=list)

    @property
    def web(self) -> Any:
        return self.node.roles["web"]

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=60, **kwargs)

    async def account(self, username: str = "alice", *, key_name: str = "first key") -> Account:
        async with self.client() as http:
            r = await http.post("/api/auth/register", json={
                "username": username, "email": f"{username}@example.com", "password": PASSWORD})
            assert r.status_code == 201, r.text
            r = await http.post("/api/auth/login", json={"username": username,
                                                         "password": PASSWORD})
            assert r.status_code == 200, r.text
            session = r.json()
            r = await http.post("/api/auth/api-keys", json={"name": key_name},
                                headers={"Authorization": f"Bearer {session['token']}"})
            assert r.status_code == 201, r.text
            key = r.json()
        return Account(username, session["user"]["user_id"], session["token"],
                       session["refresh_token"], key["api_key"], key["key_id"])


def web_tables(*, models: Sequence[dict[str, Any]] | None = (FAKE,),
               **tables: dict[str, Any]) -> dict[str, Any]:
    """Config tables for a web test node: a free port, fast hashing, the
    synthetic model (``models=None``: the embedded SmolLM2)."""
    # [web] workers as users get it ("auto": front doors, one per core);
    # P2PINFER_TEST_WEB_WORKERS=0 runs every web test inside the node
    workers = os.environ.get("P2PINFER_TEST_WEB_WORKERS")
    out: dict[str, Any] = {
        "web": {"port": 0, **({"workers": workers} if workers is not None else {}),
                **tables.pop("web", {})},
        "auth": {**FAST_AUTH, **tables.pop("auth", {})},
        "gateway": {"usage_flush_interval": 0.1, **tables.pop("gateway", {})},
        **tables,
    }
    if models is not None:
        out["models"] = list(models)
    return out


@asynccontextmanager
async def web_swarm(nursery: trio.Nursery, tmp_path: Path, *,
                    roles: Sequence[str] = ("auth", "gateway", "inference", "web"),
                    models: Sequence[dict[str, Any]] | None = (FAKE,),
                    **tables: dict[str, Any]) -> AsyncIterator[WebSwarm]:
    """One node with ``roles`` in a fresh network, its web server on a free port."""
    (home,) = make_network(tmp_path, 1, roles=list(roles))
    cfg = node_config(home, roles=list(roles), tables=web_tables(models=models, **tables))
    async with run_nodes(nursery, [cfg]) as (node,):
        inference = node.roles.get("inference")
        if inference is not None:
            with trio.fail_after(120):
                await inference.engine.wait_settled()
        yield WebSwarm(node, node.roles["web"].url, [node])


def artifact_dir(name: str) -> Path:
    """``test-artifacts/<name>`` (gitignored), created."""
    path = ARTIFACTS / name
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- the settings the helpers rely on ----------------------------------------------------
def test_web_settings_defaults_env_and_errors(tmp_path: Path) -> None:
    from p2pinfer.config import NodeConfig
    from p2pinfer.web import WebSettings

    s = WebSettings.from_config(NodeConfig.from_mapping({"node": {"home": str(tmp_path)}},
                                                        env={}))
    assert (s.host, s.port, s.max_body_bytes, s.secure_cookies) == ("127.0.0.1", 3000,
                                                                     1024 * 1024, False)
    env = NodeConfig.from_mapping({"node": {"home": str(tmp_path)}},
                                  env={"WEB_SERVICE_PORT": "0"})
    assert WebSettings.from_config(env).port == 0
    for table, message in (({"port": 70000}, "web.port: must be <= 65535"),
                           ({"colour": "red"}, "web.colour: unknown key"),
                           ({"session_cookie": "a b"}, "web.session_cookie"),
                           ({"max_body_bytes": "lots"}, "web.max_body_bytes: must be an int")):
        cfg = NodeConfig.from_mapping({"node": {"home": str(tmp_path)}, "web": table}, env={})
        with pytest.raises(ConfigError, match=message):
            WebSettings.from_config(cfg)


async def test_web_swarm_serves_on_a_free_port(tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        async with web_swarm(nursery, tmp_path) as swarm:
            web = swarm.web
            assert web.port and web.url == f"http://127.0.0.1:{web.port}"
            assert swarm.node.descriptor().info["web"] == {"port": web.port}
            async with swarm.client() as http:
                assert (await http.get("/api/health")).json()["status"] == "ok"
