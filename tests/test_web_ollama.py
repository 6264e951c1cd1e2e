"""The Ollama dialect: the ``ollama`` Python package, unchanged, against a
p2pinfer node; and p2pinfer's own Ollama backend (a ``[[models]]`` entry
with ``backend = "ollama"``) on a second node, pointed at the first node's
web port: a real end-to-end test of that adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import ollama
import trio

from p2pinfer.errors import InvalidParams
from p2pinfer.web.ollama_api import ollama_request

from .helpers import make_network, node_config, run_nodes, wait_for
from .test_web_support import PASSWORD, WebSwarm, web_swarm, web_tables


async def test_the_ollama_package_lists_shows_and_streams(tmp_path: Path,
                                                          nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        async with web_swarm(nursery, tmp_path) as swarm:
            alice = await swarm.account("alice")
            client = ollama.Client(host=swarm.url,
                                   headers={"Authorization": f"Bearer {alice.api_key}"})
            no_key = ollama.Client(host=swarm.url)

            def session() -> dict[str, Any]:
                out: dict[str, Any] = {"list": client.list(), "ps": client.ps(),
                                       "show": client.show("fake")}
                out["stream"] = list(client.chat(
                    model="fake", messages=[{"role": "user", "content": "Why is the sky blue?"}],
                    stream=True, options={"num_predict": 5, "temperature": 0}))
                out["whole"] = client.chat(
                    model="fake:latest", options={"num_predict": 5, "temperature": 0},
                    messages=[{"role": "user", "content": "Why is the sky blue?"}])
                out["generate"] = list(client.generate(model="fake", prompt="Once upon",
                                                       stream=True, options={"seed": 1}))
                out["load"] = client.generate(model="fake", prompt="")
                key = {"Authorization": f"Bearer {alice.api_key}"}
                out["bad"] = httpx.post(f"{swarm.url}/api/chat", headers=key, json={
                    "model": "fake", "messages": [{"role": "user", "content": "x"}],
                    "options": {"temperature": "hot"}})
                out["pull"] = httpx.post(f"{swarm.url}/api/pull", headers=key,
                                         json={"model": "llama3"})
                for call in (lambda: client.chat(model="llama3", messages=[
                                 {"role": "user", "content": "x"}]),
                             lambda: no_key.list()):
                    try:
                        call()
                    except ollama.ResponseError as exc:
                        out.setdefault("errors", []).append(exc)
                return out

            got = await trio.to_thread.run_sync(session)

    assert [m.model for m in got["list"].models] == ["fake:latest"]
    assert got["list"].models[0].details.family == "synthetic"
    assert [m.model for m in got["ps"].models] == ["fake:latest"]
    assert got["show"].modelinfo["p2pinfer.context_length"] == 2048
    parts = got["stream"]
    assert all(p.message.role == "assistant" for p in parts)
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    final = parts[-1]
    assert final.done_reason == "length" and final.eval_count == 5
    assert final.prompt_eval_count > 0 and final.total_duration > 0
    assert final.eval_duration is not None and final.prompt_eval_duration is not None
    text = "".join(p.message.content for p in parts)
    assert len(text.split()) == 5
    assert got["whole"].message.content == text and got["whole"].done is True
    generated = got["generate"]
    assert generated[-1].done and "".join(g.response for g in generated).strip()
    assert got["load"].done_reason == "load"
    # Ollama's error shape and statuses: a bad request is 400, not 422
    assert got["bad"].status_code == 400
    assert got["bad"].json()["error"].startswith("temperature: must be a number")
    assert got["pull"].status_code == 404 and isinstance(got["pull"].json()["error"], str)
    missing, no_key_error = got["errors"]
    assert missing.status_code == 404 and "not found" in missing.error
    assert no_key_error.status_code == 401


async def relay_ready(swarm: WebSwarm, key: str) -> bool:
    models = await swarm.web.upstream.catalog.models({"api_key": key}, fresh=True)
    return any(m["name"] == "relay" and m["status"] == "loaded" for m in models)


async def test_p2pinfers_ollama_backend_runs_against_the_web_role(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    homes = make_network(tmp_path, ["front", "relay"],
                         roles=[["auth", "gateway", "inference", "web"], ["inference"]])
    with trio.fail_after(90):
        front_cfg = node_config(homes[0], roles=["auth", "gateway", "inference", "web"],
                                tables=web_tables())
        async with run_nodes(nursery, [front_cfg]) as (front,):
            swarm = WebSwarm(front, front.roles["web"].url, [front])
            alice = await swarm.account("alice")
            port = front.roles["web"].port
            # the worker's Ollama "server" is the front node's web role; the key
            # rides in the URL as HTTP Basic credentials
            relay_model = {"name": "relay", "backend": "ollama", "remote_model": "fake",
                           "url": f"http://p2p:{alice.api_key}@127.0.0.1:{port}"}
            relay_cfg = node_config(homes[1], roles=["inference"], bootstrap=[front.addrs[0]],
                                    tables={"models": [relay_model],
                                            "inference": {"probe_interval": 1}})
            async with run_nodes(nursery, [relay_cfg]) as (relay,):
                backend = relay.roles["inference"].engine.models["relay"].backend
                await wait_for(lambda: relay_ready(swarm, alice.api_key), limit=30)
                assert backend.context_length == 2048  # from /api/show
                assert alice.api_key not in backend.where
                async with swarm.client(headers=alice.key_headers) as http:
                    body = {"messages": [{"role": "user", "content": "Tell me a story"}],
                            "max_tokens": 5, "seed": 7, "temperature": 0, "cache": False}
                    direct = (await http.post("/api/inference",
                                              json={**body, "model": "fake"})).json()
                    r = await http.post("/api/inference",
                                        json={**body, "model": "relay", "stream": True})
                    lines = [json.loads(x) for x in r.text.splitlines()]
                # the relayed answer went front → relay worker → front's /api/chat → fake
                assert lines[-1].get("done") is True, lines
                assert lines[-1]["worker"] == relay.peer_id
                assert lines[-1]["model"] == "relay"
                assert "".join(x["delta"] for x in lines[:-1]) == direct["text"]
                assert lines[-1]["usage"] == direct["usage"]
                assert lines[-1]["usage_exact"] is True
                # the relay's own calls were authenticated and counted as the key's usage
                quota = await front.rpc.call(front.peer_id, "getUserQuota",
                                             {"auth": {"api_key": alice.api_key}})
                assert quota["usage"]["requests"] >= 3


def test_ollama_request_translation() -> None:
    params, stream = ollama_request({
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "options": {"num_predict": 9, "temperature": 0.1, "top_k": 40, "stop": ["x"]},
        "keep_alive": "5m"}, chat=True)
    assert stream is True
    assert params == {"model": "m", "max_tokens": 9, "temperature": 0.1, "stop": ["x"],
                      "messages": [{"role": "user", "content": "hi"}]}
    params, stream = ollama_request({"model": "m", "prompt": "p", "system": "s",
                                     "stream": False, "options": {"num_predict": -1}},
                                    chat=False)
    assert params == {"model": "m", "prompt": "p", "system": "s"} and stream is False
    for body, field in (({"messages": []}, "model"),
                        ({"model": "m", "messages": [], "format": 7}, "format"),
                        ({"model": "m", "messages": [{"role": "user", "content": "x",
                                                      "images": ["aGk="]}]},
                         "messages[0].images"),
                        ({"model": "m", "messages": [], "tools": [{"type": "function"}]},
                         "tools[0]"),
                        ({"model": "m", "messages": [{"role": "assistant", "tool_calls": [
                            {"name": "f"}]}]}, "messages[0].tool_calls[0]")):
        try:
            ollama_request(body, chat=True)
        except InvalidParams as exc:
            assert exc.data["field"] == field
        else:
            raise AssertionError(f"{body} was accepted")
    assert PASSWORD  # the shared password keeps the account helper honest
