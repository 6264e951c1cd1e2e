"""The web role's REST API on a real node over loopback HTTP: the design
document's routes, the SDK's HTTP mode against them, and the JSON error
shape and status code of every error class the API maps."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from p2pinfer import errors
from p2pinfer.client import Client
from p2pinfer.transports.http import error_from_response

from .helpers import wait_for
from .test_web_support import FAKE, PASSWORD, web_swarm


def check_error(r: httpx.Response, status: int, cls: type[errors.P2PInferError]) -> dict[str, Any]:
    """``r`` is ``{"error": {...}}`` with ``status``, and the SDK rebuilds ``cls`` from it."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert err["code"] == cls.code and err["type"] == cls.__name__ and err["message"]
    rebuilt = error_from_response(r.status_code, r.content)
    assert type(rebuilt) is cls
    if status in (429, 503):
        assert int(r.headers["retry-after"]) >= 1
    return dict(err)


async def test_rest_flow_and_the_sdk_http_mode(tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        async with web_swarm(nursery, tmp_path) as swarm:
            alice = await swarm.account("alice")
            async with swarm.client() as http:
                # the design document's inference request
                r = await http.post("/api/inference", headers=alice.key_headers,
                                    json={"prompt": "Write a poem about AI", "model": "fake"})
                assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
                answer = r.json()
                assert len(answer["text"].split()) == 6 and answer["model"] == "fake"
                assert answer["usage"]["completion_tokens"] == 6
                assert answer["finish_reason"] == "stop" and answer["request_id"]
                assert answer["worker"] == swarm.node.peer_id
                # streamed: NDJSON deltas, then the trailer line
                r = await http.post("/api/inference", headers=alice.bearer,
                                    json={"prompt": "Write a poem about AI", "model": "fake",
                                          "stream": True, "cache": False})
                assert r.headers["content-type"] == "application/x-ndjson"
                lines = [json.loads(line) for line in r.text.splitlines()]
                assert "".join(x["delta"] for x in lines[:-1]) == answer["text"]
                assert lines[-1]["done"] is True and lines[-1]["usage"] == answer["usage"]
                # aliases and modelConfig (the design document's shape) reach the worker
                r = await http.post("/api/inference", headers=alice.key_headers, json={
                    "prompt": "hi", "modelConfig": {"model": "fake", "max_tokens": 2}})
                assert r.json()["usage"]["completion_tokens"] == 2

                # account and keys
                me = (await http.get("/api/auth/me", headers=alice.bearer)).json()
                assert me["username"] == "alice" and "password_hash" not in me
                r = await http.post("/api/auth/api-keys", headers=alice.bearer, json={})
                assert r.status_code == 201 and r.json()["name"] is None
                second = r.json()
                keys = (await http.get("/api/auth/api-keys", headers=alice.key_headers)).json()
                assert {k["key_id"] for k in keys["keys"]} == {alice.key_id, second["key_id"]}
                assert all("api_key" not in k and "key_hash" not in k for k in keys["keys"])
                r = await http.delete(f"/api/auth/api-keys/{second['key_id']}",
                                      headers=alice.bearer)
                assert r.status_code == 200 and r.json()["already_revoked"] is False
                r = await http.post("/api/inference", json={"prompt": "hi"},
                                    headers={"X-API-Key": second["api_key"]})
                check_error(r, 401, errors.RevokedApiKey)
                # the same revocation through the body form of DELETE
                r = await http.request("DELETE", "/api/auth/api-keys", headers=alice.bearer,
                                       json={"key_id": second["key_id"]})
                assert r.json()["already_revoked"] is True

            # the SDK's HTTP mode, unchanged
            async with Client(base_url=swarm.url, api_key=alice.api_key) as client:
                response = await client.inference(prompt="Hello", model="fake", max_tokens=3)
                assert response.usage["completion_tokens"] == 3 and response.model == "fake"
                assert response.request_id and response.worker == swarm.node.peer_id
                parts = []
                async with client.stream(prompt="Hello", model="fake") as stream:
                    async for text in stream:
                        parts.append(text)
                assert stream.response is not None
                assert "".join(parts) == stream.response.text and len(parts[0]) > 0
                models = await client.models()
                assert [m["name"] for m in models] == ["fake"]
                quota = await client.quota()
                assert quota["usage"]["requests"] >= 5 and quota["limits"]["requests"] == 100
                await wait_for(lambda: swarm.node.ledger.usage(user_id=alice.user_id), limit=10)
                usage = await client.usage()
                assert sum(u["requests"] for u in usage) >= 1
                assert (await client.health())["web"]["peer_id"] == swarm.node.peer_id
                with pytest.raises(errors.UnknownModel):
                    await client.inference(prompt="Hello", model="no-such-model")

            async with swarm.client() as http:
                # refresh rotates; logout ends the session everywhere
                r = await http.post("/api/auth/refresh",
                                    json={"refresh_token": alice.refresh_token})
                assert r.status_code == 200
                fresh = r.json()
                r = await http.post("/api/auth/refresh",
                                    json={"refresh_token": alice.refresh_token})
                check_error(r, 401, errors.TokenRevoked)  # reuse ends the session
                r = await http.post("/api/auth/logout",
                                    headers={"Authorization": f"Bearer {fresh['token']}"})
                assert r.json()["revoked"] is True
                check_error(await http.get("/api/auth/me", headers={
                    "Authorization": f"Bearer {fresh['token']}"}), 401, errors.TokenRevoked)


async def test_every_error_class_has_its_status_and_shape(tmp_path: Path,
                                                          nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        async with web_swarm(nursery, tmp_path, web={"max_body_bytes": 2048}) as swarm:
            alice = await swarm.account("alice")
            bob = await swarm.account("bob1", key_name="bob's")
            async with swarm.client() as http:
                # 401: no credential, a bad key, a bad token, the wrong kind of credential
                check_error(await http.post("/api/inference", json={"prompt": "x"}),
                            401, errors.AuthenticationRequired)
                r = await http.post("/api/inference", json={"prompt": "x"},
                                    headers={"X-API-Key": "p2p_nope"})
                assert check_error(r, 401, errors.InvalidApiKey)["data"]["reason"] == "malformed"
                assert r.headers["www-authenticate"].startswith("Bearer")
                check_error(await http.get("/api/usage", headers={
                    "Authorization": "Bearer not.a.token"}), 401, errors.InvalidToken)
                check_error(await http.post("/api/auth/api-keys", json={},
                                            headers=alice.key_headers),
                            401, errors.AuthenticationRequired)  # keys need a session
                check_error(await http.post("/api/auth/login", json={
                    "username": "alice", "password": "wrong password here"}),
                    401, errors.InvalidCredentials)
                check_error(await http.post("/api/auth/login", json={
                    "username": "nobody", "password": PASSWORD}), 401, errors.InvalidCredentials)
                # 403: another user's key
                check_error(await http.delete(f"/api/auth/api-keys/{alice.key_id}",
                                              headers=bob.bearer), 403, errors.PermissionDenied)
                # 404: a model nobody serves, a key that does not exist, a route
                r = await http.post("/api/inference", headers=alice.key_headers,
                                    json={"prompt": "x", "model": "llama-9000"})
                assert check_error(r, 404, errors.UnknownModel)["data"]["model"] == "llama-9000"
                check_error(await http.delete(
                    "/api/auth/api-keys/00000000-0000-4000-8000-000000000000",
                    headers=alice.bearer), 404, errors.NotFound)
                check_error(await http.get("/api/nothing-here"), 404, errors.NotFound)
                r = await http.put("/api/inference")
                assert r.status_code == 405 and r.json()["error"]["type"] == "UnknownMethod"
                # 409: taken names
                check_error(await http.post("/api/auth/register", json={
                    "username": "alice", "email": "other@example.com", "password": PASSWORD}),
                    409, errors.UsernameTaken)
                check_error(await http.post("/api/auth/register", json={
                    "username": "alice2", "email": "alice@example.com", "password": PASSWORD}),
                    409, errors.EmailTaken)
                # 413: too large, by Content-Length and by a chunked body
                big = {"prompt": "x" * 5000}
                check_error(await http.post("/api/inference", json=big,
                                            headers=alice.key_headers), 413, errors.FrameTooLarge)

                async def chunks() -> Any:
                    for _ in range(5):
                        yield b" " * 1000

                check_error(await http.post("/api/inference", content=chunks(),
                                            headers=alice.key_headers), 413, errors.FrameTooLarge)
                # 422: every field problem names its field
                for body, field in (({}, "prompt"), ({"prompt": "x", "temprature": 1},
                                                     "temprature"),
                                    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
                                    ({"prompt": "x", "stream": "yes"}, "stream"),
                                    ({"messages": [{"role": "robot", "content": "x"}]},
                                     "messages[0].role")):
                    r = await http.post("/api/inference", json=body, headers=alice.key_headers)
                    assert check_error(r, 422, errors.InvalidParams)["data"]["field"] == field
                # the credential first: a client without a valid one learns
                # nothing of what its request lacks
                nope = {"X-API-Key": "p2p_nope"}
                check_error(await http.post("/api/inference", json={}, headers=nope),
                            401, errors.InvalidApiKey)
                r = await http.post("/v1/chat/completions", headers=nope, json={
                    "model": "fake", "messages": [{"role": "user", "content": "x"}],
                    "temperature": 9})
                assert r.status_code == 401, r.text
                r = await http.post("/api/inference", content=b"{not json",
                                    headers=alice.key_headers)
                assert check_error(r, 422, errors.InvalidParams)["data"]["field"] == "body"
                check_error(await http.post("/api/auth/register", json={
                    "username": "carol", "email": "carol@example.com", "password": "password"}),
                    422, errors.WeakPassword)
                check_error(await http.post("/api/auth/register", json={
                    "username": "<b>x</b>", "email": "x@example.com", "password": PASSWORD}),
                    422, errors.InvalidUsername)
                check_error(await http.post("/api/auth/register", json={
                    "username": "dave", "email": "not-an-email", "password": PASSWORD}),
                    422, errors.InvalidEmail)
                check_error(await http.get("/api/usage?since=yesterday",
                                           headers=alice.key_headers), 422, errors.InvalidParams)


async def test_rate_limits_and_login_throttling_are_429_with_retry_after(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        async with web_swarm(nursery, tmp_path, gateway={"default_rate_limit": 3},
                             auth={"max_failures_per_account": 2}) as swarm:
            alice = await swarm.account("alice")
            async with swarm.client() as http:
                for _ in range(3):
                    r = await http.post("/api/inference", headers=alice.key_headers,
                                        json={"prompt": "x", "model": "fake"})
                    assert r.status_code == 200
                r = await http.post("/api/inference", headers=alice.key_headers,
                                    json={"prompt": "x", "model": "fake"})
                err = check_error(r, 429, errors.RateLimited)
                assert err["data"]["limit"] == 3
                assert int(r.headers["retry-after"]) >= int(err["data"]["retry_after"])
                for _ in range(2):
                    r = await http.post("/api/auth/login", json={"username": "alice",
                                                                 "password": "not the one!!"})
                    assert r.status_code == 401
                r = await http.post("/api/auth/login", json={"username": "alice",
                                                             "password": PASSWORD})
                assert check_error(r, 429, errors.LoginThrottled)["data"]["scope"] == "account"


async def test_no_gateway_in_reach_is_503(tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        async with web_swarm(nursery, tmp_path, roles=("auth", "web"), models=None) as swarm:
            alice = await swarm.account("alice")
            async with swarm.client() as http:
                err = check_error(await http.get("/api/health"), 503, errors.PeerUnavailable)
                assert err["data"]["role"] == "gateway"
                check_error(await http.post("/api/inference", headers=alice.key_headers,
                                            json={"prompt": "x"}), 503, errors.PeerUnavailable)


async def test_a_client_that_leaves_mid_stream_cancels_the_request(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    slow = {**FAKE, "tokens": 200, "token_delay": 0.05}
    with trio.fail_after(60):
        async with web_swarm(nursery, tmp_path, models=[slow]) as swarm:
            alice = await swarm.account("alice")
            gateway = swarm.node.roles["gateway"]
            async with swarm.client() as http:
                async with http.stream("POST", "/api/inference", headers=alice.key_headers,
                                       json={"prompt": "x", "stream": True,
                                             "model": "fake"}) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        assert "delta" in json.loads(line)
                        break
                    assert gateway.in_flight == 1
            # the connection closed after one line: the gateway's request ends
            # long before the 10 s the whole answer would take
            await wait_for(lambda: gateway.in_flight == 0, limit=5)
            rows = await wait_for(lambda: swarm.node.ledger.request_logs(
                user_id=alice.user_id), limit=5)
            assert rows[0].status == "cancelled"


async def test_requests_are_counted_by_route_template(tmp_path: Path,
                                                      nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        async with web_swarm(nursery, tmp_path) as swarm:
            alice = await swarm.account("alice")
            async with swarm.client() as http:
                await http.delete(f"/api/auth/api-keys/{alice.key_id}", headers=alice.bearer)
                await http.get("/api/models", headers=alice.key_headers)  # revoked: 401
                await http.get(f"/no/such/{alice.api_key}")
            reg = swarm.node.registry

            def count(method: str, status: str) -> float:
                value = reg.get_sample_value("ai_platform_requests_total", {
                    "service": "web", "method": method, "status": status})
                return value or 0.0

            expected = {("DELETE:/api/auth/api-keys/:key_id", "success"): 1,
                        ("POST:/api/auth/register", "success"): 1,
                        ("GET:/api/models", "denied"): 1,
                        ("GET:_unmatched", "client_error"): 1}
            # each front-door process hands its counts to the node every
            # second, on its own clock: wait for all of them
            await wait_for(lambda: all(count(*k) >= v for k, v in expected.items()), limit=5)
            assert {k: count(*k) for k in expected} == expected
            # no raw path (and so no key) ever becomes a label value
            text = swarm.node.metrics.text().decode()
            assert alice.api_key not in text and alice.key_id not in text



async def test_api_key_guessing_over_http_is_throttled_per_client(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """Invalid keys sent over HTTP count against the HTTP client's address
    (not the web node's), by what they guess at: unknown keys lock out
    further unknown keys from that address, never a valid key; wrong
    secrets of one key id lock out that key from that address."""
    async with web_swarm(nursery, tmp_path,
                         auth={"max_failures_per_source": 3, "throttle_window": 60}) as swarm:
        account = await swarm.account()
        inference = {"prompt": "hi", "model": "fake"}
        async with swarm.client() as http:
            r = await http.post("/api/inference", json=inference, headers=account.key_headers)
            assert r.status_code == 200, r.text
            for i in range(3):
                r = await http.get("/api/models", headers={"X-API-Key": f"p2p_guess{i:07d}_x"})
                assert r.status_code == 401, r.text
            r = await http.get("/api/models", headers={"X-API-Key": "p2p_guess9999999_x"})
            assert r.status_code == 429 and "Retry-After" in r.headers, r.text
            assert r.json()["error"]["type"] == "LoginThrottled"
            # the client cannot pose as another address: forwarding headers
            # are not trusted, whichever server (front door or node) serves
            for i, forged in enumerate(({"X-Forwarded-For": "203.0.113.7"},
                                        {"Forwarded": "for=203.0.113.8"},
                                        {"X-Real-IP": "203.0.113.9"})):
                r = await http.get("/api/models", headers={
                    "X-API-Key": f"p2p_forge{i:07d}_x", **forged})
                assert r.status_code == 429, (forged, r.text)
            # the client's own valid key still works
            r = await http.post("/api/inference", json=inference, headers=account.key_headers)
            assert r.status_code == 200, r.text
            # guessing the secret of a real key id: that key is locked out here
            wrong = account.api_key[:-4] + ("aaaa" if not account.api_key.endswith("aaaa")
                                            else "bbbb")
            for _ in range(3):
                r = await http.get("/api/models", headers={"X-API-Key": wrong})
                assert r.status_code == 401, r.text
            r = await http.post("/api/inference", json=inference, headers=account.key_headers)
            assert r.status_code == 429
        # counted under the HTTP client's address, not under the web node
        failures = swarm.web.upstream.node.authenticator.key_failures
        assert failures.count("ip:127.0.0.1|?", time.time()) >= 3


async def test_one_typo_locks_out_nobody(tmp_path: Path, nursery: trio.Nursery) -> None:
    """A mistyped key costs its client one failure (not one per re-check
    while the web node waits for the key to replicate), and 100 bad keys
    from one address leave clients at other addresses unaffected on every
    route, sessions and keys alike."""
    async with web_swarm(nursery, tmp_path) as swarm:
        alice = await swarm.account("alice")
        bob = await swarm.account("bob")
        typo = alice.api_key[:8] + ("x" if alice.api_key[8] != "x" else "y") + alice.api_key[9:]
        async with swarm.client() as http:
            started = trio.current_time()
            r = await http.get("/api/models", headers={"X-API-Key": typo})
            assert r.status_code == 401, r.text
            assert trio.current_time() - started >= 0.5  # it waited for replication
            r = await http.get("/api/models", headers=alice.key_headers)
            assert r.status_code == 200, r.text
        failures = swarm.web.upstream.node.authenticator.key_failures
        assert failures.count("ip:127.0.0.1|?", time.time()) == 1
        # 100 bad keys from 127.0.0.2
        other = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with swarm.client(transport=other) as attacker:
            for i in range(100):
                r = await attacker.get("/api/auth/me",
                                       headers={"X-API-Key": f"p2p_bad{i:09d}_x"})
                assert r.status_code in (401, 429), r.text
            assert r.status_code == 429
        # bob, at 127.0.0.1, on every route
        async with swarm.client() as http:
            for method, path, body, headers in (
                    ("GET", "/api/models", None, bob.key_headers),
                    ("POST", "/api/inference", {"prompt": "hi", "model": "fake"},
                     bob.key_headers),
                    ("POST", "/v1/chat/completions",
                     {"model": "fake", "messages": [{"role": "user", "content": "hi"}]},
                     {"Authorization": f"Bearer {bob.api_key}"}),
                    ("GET", "/api/auth/me", None, bob.bearer),
                    ("GET", "/api/auth/api-keys", None, bob.bearer),
                    ("GET", "/api/usage", None, bob.bearer)):
                r = await http.request(method, path, json=body, headers=headers)
                assert r.status_code == 200, (path, r.status_code, r.text)
