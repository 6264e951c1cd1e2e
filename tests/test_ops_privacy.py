"""Data export and erasure on a real three-node swarm.

A user registers, makes requests through two gateways and is exported
(RPC and REST); then erases the account. After convergence no node returns
the username or the email from any API: auth RPC, REST, the OpenAI and
Ollama surfaces, the pages (dashboard, system, account), audit queries,
exports, the ledger's own replication stream, nor the nodes' database
files; usage totals are unchanged everywhere, and the name is free again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from p2pinfer import errors
from p2pinfer.client import Client

from .helpers import make_network, node_config, run_nodes, wait_for
from .test_web_support import FAKE, PASSWORD, web_tables

NAME = "zelda_quartz"
EMAIL = "zelda.private@example.org"
SECRETS = (NAME, EMAIL, NAME.upper(), "zelda.private")
PROMPT = "my very private prompt about turnips"


def clean(text: str | bytes, where: str) -> None:
    """``text`` holds neither the username nor the email."""
    data = text if isinstance(text, str) else text.decode("latin-1")
    for secret in SECRETS:
        assert secret.lower() not in data.lower(), f"{secret!r} found in {where}"


def cookie(token: str) -> dict[str, str]:
    """The session cookie of the pages, as a header."""
    return {"Cookie": f"p2p_session={token}"}


async def all_events(node: Any, peer: str) -> bytes:
    """Every event (raw bytes) ``node`` pulls from ``peer`` with ledgerPull."""
    vv = (await node.rpc.call(peer, "ledgerSync", {"vv": {}, "digest": b""}))["vv"]
    out = b""
    async with node.rpc.stream(peer, "ledgerPull", {"after": dict.fromkeys(vv, 0),
                                                    "limit": 100_000}) as chunks:
        async for chunk in chunks:
            out += b"".join(chunk)
    return out


def usage_of(node: Any, user_id: str) -> list[tuple[Any, ...]]:
    return [(u.date, u.api_key_id, u.request_count, u.tokens_used)
            for u in node.ledger.usage(user_id=user_id)]


async def test_export_then_erasure_leaves_no_name_anywhere(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    roles = [["auth", "gateway", "inference", "web"], ["auth", "metrics", "web"],
             ["gateway", "web"]]
    # c's key also acts for the operator (as_operator needs that grant)
    homes = make_network(tmp_path, ["a", "b", "c"], roles=[*roles[:2], [*roles[2], "operator"]])
    tables = web_tables(models=[FAKE], metrics={"prometheus_port": 0, "interval": 0.5})
    with trio.fail_after(150):
        async with run_nodes(nursery, [node_config(homes[0], roles=roles[0],
                                                   tables=tables)]) as (a,):
            others = [node_config(h, roles=r, bootstrap=[a.addrs[0]], tables=tables)
                      for h, r in zip(homes[1:], roles[1:], strict=True)]
            async with run_nodes(nursery, others) as (b, c):
                nodes = [a, b, c]
                await a.roles["inference"].engine.wait_settled()
                urls = [n.roles["web"].url for n in nodes]

                async with httpx.AsyncClient(timeout=30) as http:
                    # the user and a bystander, made on A; requests through A and C
                    users: dict[str, dict[str, Any]] = {}
                    for name, mail in ((NAME, EMAIL), ("bob_bystander", "bob@example.com")):
                        r = await http.post(f"{urls[0]}/api/auth/register", json={
                            "username": name, "email": mail, "password": PASSWORD})
                        assert r.status_code == 201, r.text
                        session = (await http.post(f"{urls[0]}/api/auth/login", json={
                            "username": name, "password": PASSWORD})).json()
                        key = (await http.post(
                            f"{urls[0]}/api/auth/api-keys", json={"name": "k"},
                            headers={"Authorization": f"Bearer {session['token']}"})).json()
                        users[name] = {"id": session["user"]["user_id"],
                                       "token": session["token"], "key": key["api_key"],
                                       "key_id": key["key_id"]}
                    z, bob = users[NAME], users["bob_bystander"]
                    for url in (urls[0], urls[2], urls[2]):
                        r = await http.post(f"{url}/api/inference", json={
                            "prompt": PROMPT, "model": "fake", "cache": False},
                            headers={"X-API-Key": z["key"]})
                        assert r.status_code == 200, r.text

                    # every node sees the three requests in the user's usage; the
                    # request logs stay with their gateway (c keeps its own two) and
                    # its keepers (the auth nodes a and b keep all three)
                    logs_held = {a.peer_id: 3, b.peer_id: 3, c.peer_id: 2}

                    def converged() -> bool:
                        return all(sum(u[2] for u in usage_of(n, z["id"])) == 3
                                   and len(n.ledger.request_logs(user_id=z["id"]))
                                   == logs_held[n.peer_id]
                                   and n.ledger.user(z["id"]) is not None for n in nodes)

                    await wait_for(converged, limit=30)
                    before = {n.peer_id: usage_of(n, z["id"]) for n in nodes}
                    assert len({json.dumps(v) for v in before.values()}) == 1
                    for n in nodes:  # any node reads all of them across the swarm
                        assert len(await n.ledger.gather_request_logs(z["id"])) == 3

                    # -- export: REST on a node without auth, and RPC ------------------
                    r = await http.get(f"{urls[2]}/api/auth/export",
                                       headers={"Authorization": f"Bearer {z['token']}"})
                    assert r.status_code == 200, r.text
                    export = r.json()
                    assert export["account"]["username"] == NAME
                    assert export["account"]["email"] == EMAIL
                    assert "password_hash" not in json.dumps(export)
                    assert [k["key_id"] for k in export["api_keys"]] == [z["key_id"]]
                    assert z["key"] not in r.text and "key_hash" not in r.text
                    assert export["usage"]["total"]["requests"] == 3
                    assert {h["gateway"] for h in export["usage"]["hourly"]} == {
                        a.peer_id, c.peer_id}
                    assert len(export["request_logs"]) == 3 and PROMPT not in r.text
                    assert all(len(x["prompt_hash"]) == 64 for x in export["request_logs"])
                    actions = {x["action"] for x in export["audit"]}
                    assert {"user.register", "user.login", "apikey.issue"} <= actions
                    assert all(bob["id"] not in json.dumps(x) for x in export["audit"])
                    # an API key is not enough, and nobody else's data
                    r = await http.get(f"{urls[2]}/api/auth/export",
                                       headers={"X-API-Key": z["key"]})
                    assert r.status_code == 401
                    r = await http.get(f"{urls[0]}/api/auth/export",
                                       params={"user_id": z["id"]},
                                       headers={"Authorization": f"Bearer {bob['token']}"})
                    assert r.status_code == 403
                    rpc_export = await c.rpc.call(b.peer_id, "exportUserData",
                                                  {"token": z["token"]})
                    assert rpc_export["account"] == export["account"]
                    async with Client(base_url=urls[1], token=z["token"]) as client:
                        assert (await client.export_data())["account"]["user_id"] == z["id"]

                    # -- erasure: a wrong password changes nothing ------------------------
                    r = await http.request("DELETE", f"{urls[2]}/api/auth/me",
                                           json={"password": "not the password"},
                                           headers={"Authorization": f"Bearer {z['token']}"})
                    assert r.status_code == 401 and r.json()["error"]["type"] == \
                        "InvalidCredentials"
                    r = await http.request("DELETE", f"{urls[2]}/api/auth/me", json={},
                                           headers={"Authorization": f"Bearer {z['token']}"})
                    assert r.status_code == 422
                    assert all(n.ledger.user(z["id"]) is not None for n in nodes)
                    # the pages still show the user before the erasure (the check below
                    # would catch a page that shows them)
                    page = await http.get(f"{urls[1]}/account",
                                          headers=cookie(z["token"]))
                    assert NAME in page.text and EMAIL in page.text

                    r = await http.request("DELETE", f"{urls[2]}/api/auth/me",
                                           json={"password": PASSWORD},
                                           headers={"Authorization": f"Bearer {z['token']}"})
                    assert r.status_code == 200, r.text
                    erased = r.json()
                    assert erased["user_id"] == z["id"] and erased["revoked_keys"] == 1
                    assert erased["redacted"] == 1 and erased["already_erased"] is False

                    # -- convergence: the tombstone everywhere, registrations as stubs ----
                    def gone() -> bool:
                        for n in nodes:
                            conn = n.ledger.store.conn
                            if n.ledger.user(z["id"]) is not None:
                                return False
                            if conn.execute("SELECT count(*) FROM events WHERE "
                                            "kind='user.registered' AND redacted=1"
                                            ).fetchone()[0] != 1:
                                return False
                        return True

                    await wait_for(gone, limit=30)
                    for n in nodes:
                        assert usage_of(n, z["id"]) == before[n.peer_id]  # totals unchanged
                        assert len(n.ledger.request_logs(user_id=z["id"])) == \
                            logs_held[n.peer_id]

                    # -- no API of any node returns the name or the email -----------------
                    z_token = {"Authorization": f"Bearer {z['token']}"}
                    bob_token = {"Authorization": f"Bearer {bob['token']}"}
                    for n, url in zip(nodes, urls, strict=True):
                        for path, headers in (
                                ("/api/auth/me", z_token), ("/api/auth/me", {
                                    "X-API-Key": z["key"]}),
                                ("/api/auth/export", z_token), ("/api/usage", {
                                    "X-API-Key": z["key"]}),
                                ("/v1/models", {"Authorization": f"Bearer {z['key']}"}),
                                ("/api/tags", {"X-API-Key": z["key"]}),
                                ("/api/auth/api-keys", z_token)):
                            r = await http.get(url + path, headers=headers)
                            assert r.status_code == 401, (url, path, r.text)
                            clean(r.text, f"{url}{path}")
                        r = await http.post(f"{url}/api/auth/login", json={
                            "username": NAME, "password": PASSWORD})
                        assert r.status_code == 401
                        clean(r.text, f"{url} login")
                        # the bystander's views: export, pages, OpenAI and Ollama lists
                        for path in ("/api/auth/export", "/api/auth/me", "/api/usage"):
                            r = await http.get(url + path, headers=bob_token)
                            assert r.status_code == 200, r.text
                            clean(r.text, f"{url}{path} (bob)")
                        for path in ("/dashboard", "/system", "/account", "/api-keys"):
                            r = await http.get(url + path, headers=cookie(bob["token"]))
                            assert r.status_code == 200, (path, r.status_code)
                            clean(r.text, f"{url}{path} page")
                            if path == "/system":  # bob is no admin: models, no member list
                                assert "<td>fake</td>" in r.text and 'id="scaling"' not in r.text
                                assert all(m.peer_id not in r.text for m in nodes)
                        r = await http.get(url + "/account", headers=cookie(z["token"]))
                        assert r.status_code in (200, 303)
                        clean(r.text, f"{url}/account as the erased user")
                        # the ledger's replication stream and the node's files
                        clean(await all_events(a if n is not a else b, n.peer_id),
                              f"ledgerPull from {n.peer_id}")
                        db = n.config.database_path
                        for path in (db, db.with_name(db.name + "-wal")):
                            if path.exists():
                                clean(path.read_bytes(), str(path))

                    # auth RPC (as a member and as the operator), audit queries
                    for auth in (a, b):
                        for method, params in (
                                ("getUser", {"token": z["token"]}),
                                ("validateApiKey", {"api_key": z["key"]}),
                                ("loginUser", {"email": EMAIL, "password": PASSWORD}),
                                ("exportUserData", {"as_operator": True, "user_id": z["id"]}),
                                ("exportUserData", {"token": z["token"]})):
                            with pytest.raises(errors.P2PInferError) as caught:
                                await c.rpc.call(auth.peer_id, method, params)
                            clean(caught.value.message + json.dumps(caught.value.data),
                                  f"{method} on {auth.peer_id}")
                        again = await c.rpc.call(auth.peer_id, "eraseUser", {
                            "as_operator": True, "user_id": z["id"]})
                        assert again["already_erased"] is True
                    audit = await a.rpc.call(b.peer_id, "getAuditLog", {"limit": 1000})
                    assert any(r["action"] == "user.erase" and r["target"] == f"user:{z['id']}"
                               for r in audit["rows"])
                    clean(json.dumps(audit), "getAuditLog")
                    health = await a.rpc.call(b.peer_id, "getSystemHealth")
                    clean(json.dumps(health), "getSystemHealth")

                    # the names are free again for someone new
                    r = await http.post(f"{urls[1]}/api/auth/register", json={
                        "username": NAME, "email": EMAIL, "password": PASSWORD})
                    assert r.status_code == 201, r.text
                    assert r.json()["user_id"] != z["id"]


async def test_admin_erases_a_user_and_the_account_page_deletes_itself(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    from .test_web_support import web_swarm

    with trio.fail_after(60):
        async with web_swarm(nursery, tmp_path) as swarm:
            node = swarm.node
            admin = await swarm.account("root_admin")
            victim = await swarm.account("victim_user")
            await node.rpc.call(node.peer_id, "setUserAdmin", {
                "as_operator": True, "user_id": admin.user_id, "is_admin": True})
            async with swarm.client() as http:
                r = await http.get("/api/auth/export", params={"user_id": victim.user_id},
                                   headers=admin.bearer)
                assert r.status_code == 200 and r.json()["account"]["username"] == "victim_user"
                r = await http.delete(f"/api/auth/users/{victim.user_id}", headers=victim.bearer)
                assert r.status_code == 422  # one's own account needs the password
                r = await http.delete(f"/api/auth/users/{victim.user_id}", headers=admin.bearer)
                assert r.status_code == 200 and r.json()["revoked_keys"] == 1
                assert node.ledger.user(victim.user_id) is None
            async with Client(base_url=swarm.url, token=admin.token) as client:
                again = await client.erase_account(user_id=victim.user_id)
                assert again["already_erased"] is True

            # the account page: download, then delete (CSRF token from the page)
            async with swarm.client() as http:
                http.cookies.set("p2p_session", admin.token)
                page = await http.get("/account")
                assert page.status_code == 200 and "root_admin" in page.text
                r = await http.get("/account/export")
                assert r.headers["content-disposition"].startswith("attachment;")
                assert r.json()["account"]["user_id"] == admin.user_id
                import re

                token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
                assert token is not None
                r = await http.post("/account/delete", data={
                    "csrf_token": token.group(1), "password": "wrong password!!", "confirm":
                    "yes"})
                assert r.status_code == 401 and node.ledger.user(admin.user_id) is not None
                r = await http.post("/account/delete", data={
                    "csrf_token": token.group(1), "password": PASSWORD, "confirm": "yes"})
                assert r.status_code == 200 and "Your account is deleted" in r.text
                assert node.ledger.user(admin.user_id) is None
                assert any(c.startswith("p2p_session=") for c in
                           r.headers.get_list("set-cookie"))
