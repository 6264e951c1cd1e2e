"""The pages over plain HTTP: security headers, cookie flags, CSRF
refusals, escaping of hostile user text, friendly login-throttling errors,
session renewal and logout. (The whole flow in a real browser is
``tests/test_web_browser.py``.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import trio

from p2pinfer.web.app import method_label
from p2pinfer.web.charts import bar_chart, day_range, hbar_chart
from p2pinfer.web.credentials import credentials_from_headers

from .helpers import wait_for
from .test_web_support import PASSWORD, WebSwarm, web_swarm

HOSTILE = '<script>alert("pwned")</script>'
SECURITY_HEADERS = ("content-security-policy", "x-content-type-options", "x-frame-options",
                    "referrer-policy")


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


async def log_in(swarm: WebSwarm, http: httpx.AsyncClient, username: str) -> None:
    page = await http.get("/login")
    r = await http.post("/login", data={"login": username, "password": PASSWORD,
                                        "csrf_token": csrf_of(page.text), "next": "/dashboard"})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard", r.text


async def test_headers_cookies_and_csrf(tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        async with web_swarm(nursery, tmp_path) as swarm:
            alice = await swarm.account("alice")
            async with swarm.client() as http:
                for path in ("/", "/login", "/static/style.css", "/nope", "/openapi.json",
                             "/docs"):
                    r = await http.get(path)
                    for name in SECURITY_HEADERS:
                        assert name in r.headers, (path, name)
                    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
                    assert "'unsafe-inline'" not in r.headers["content-security-policy"]
                    assert r.headers["x-content-type-options"] == "nosniff"
                r = await http.get("/api/tags", headers=alice.key_headers)
                assert r.headers["x-frame-options"] == "DENY"

                # anonymous pages that need a session redirect to the login
                r = await http.get("/dashboard")
                assert r.status_code == 303 and r.headers["location"] == "/login?next=/dashboard"

                # a form without its token, or with a forged one, is refused
                r = await http.post("/login", data={"login": "alice", "password": PASSWORD})
                assert r.status_code == 403 and "reload the page" in r.text
                page = await http.get("/login")
                token = csrf_of(page.text)
                r = await http.post("/login", data={"login": "alice", "password": PASSWORD,
                                                    "csrf_token": token[:-2] + "00"})
                assert r.status_code == 403
                r = await http.post("/login", headers={"Origin": "https://evil.example"},
                                    data={"login": "alice", "password": PASSWORD,
                                          "csrf_token": token})
                assert r.status_code == 403 and "cross-site" in r.text
                # a token from another browser's page does not fit this browser's cookie
                async with swarm.client() as other:
                    foreign = csrf_of((await other.get("/login")).text)
                r = await http.post("/login", data={"login": "alice", "password": PASSWORD,
                                                    "csrf_token": foreign})
                assert r.status_code == 403

                # the real login: HttpOnly, SameSite cookies, no Secure without TLS
                r = await http.post("/login", data={"login": "alice", "password": PASSWORD,
                                                    "csrf_token": token, "next": "//evil.com"})
                assert r.status_code == 303 and r.headers["location"] == "/dashboard"
                cookies = r.headers.get_list("set-cookie")
                session = next(c for c in cookies if c.startswith("p2p_session="))
                assert "HttpOnly" in session and "SameSite=lax" in session
                assert "Secure" not in session and "Path=/" in session
                csrf_cookie = next(c for c in cookies if c.startswith("p2p_session_csrf="))
                assert "SameSite=strict" in csrf_cookie and "HttpOnly" in csrf_cookie
                # the CSRF value changed at login: the old page's token is dead
                r = await http.post("/api-keys", data={"name": "x", "csrf_token": token})
                assert r.status_code == 403
                keys = await http.get("/api/auth/api-keys", headers=alice.bearer)
                assert len(keys.json()["keys"]) == 1  # nothing was created
                page = await http.get("/api-keys")
                r = await http.post("/api-keys", data={"name": "ok",
                                                       "csrf_token": csrf_of(page.text)})
                assert r.status_code == 201 and 'id="new-key-value"' in r.text
                assert r.headers["cache-control"] == "no-store"

                # logout ends the session: the cookie no longer opens the dashboard
                old = http.cookies.get("p2p_session")
                r = await http.post("/logout", data={"csrf_token": csrf_of(r.text)})
                assert r.status_code == 303
                async with swarm.client(cookies={"p2p_session": old or ""}) as replay:
                    r = await replay.get("/dashboard")
                assert r.status_code == 303


async def test_secure_cookies_when_configured(tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        async with web_swarm(nursery, tmp_path, web={"secure_cookies": True}) as swarm:
            await swarm.account("alice")
            async with swarm.client() as http:
                page = await http.get("/login")
                assert "Secure" in page.headers["set-cookie"]
                r = await http.post("/login", data={"login": "alice", "password": PASSWORD,
                                                    "csrf_token": csrf_of(page.text)})
                assert all("Secure" in c for c in r.headers.get_list("set-cookie"))


async def test_hostile_text_is_escaped(tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        async with web_swarm(nursery, tmp_path) as swarm:
            alice = await swarm.account("alice", key_name=HOSTILE)
            async with swarm.client() as http:
                # a hostile username is refused, and echoed back escaped
                page = await http.get("/register")
                r = await http.post("/register", data={
                    "username": HOSTILE, "email": "x@example.com", "password": PASSWORD,
                    "csrf_token": csrf_of(page.text)})
                assert r.status_code == 422
                assert HOSTILE not in r.text
                assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;" in r.text
                r = await http.get("/login", params={"registered": HOSTILE})
                assert HOSTILE not in r.text and "&lt;script&gt;" in r.text

                await log_in(swarm, http, "alice")
                r = await http.post("/api/inference", headers=alice.key_headers,
                                    json={"prompt": HOSTILE, "model": "fake"})
                assert r.status_code == 200
                await wait_for(lambda: swarm.node.ledger.usage(user_id=alice.user_id), limit=10)
                for path in ("/api-keys", "/dashboard"):
                    html = (await http.get(path)).text
                    assert HOSTILE not in html and "<script" not in html, path
                    assert "&lt;script&gt;alert(" in html, path
                # a prompt and its answer in the playground
                page = await http.get("/playground")
                r = await http.post("/playground", data={
                    "prompt": HOSTILE, "model": "fake", "max_tokens": "3",
                    "temperature": "0", "csrf_token": csrf_of(page.text)})
                assert r.status_code == 200 and 'id="answer"' in r.text
                assert HOSTILE not in r.text  # the only script is the page's own:
                assert r.text.count("<script") == 1
                assert '<script src="/static/playground.js" defer></script>' in r.text
                # the same form, streamed for the page's script (NDJSON)
                form = {"prompt": HOSTILE, "model": "fake", "max_tokens": "3",
                        "temperature": "0"}
                r = await http.post("/playground/stream", data=form)
                assert r.status_code == 403 and r.json()["error"]["type"] == "PermissionDenied"
                r = await http.post("/playground/stream",
                                    data={**form, "csrf_token": csrf_of(page.text)})
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("application/x-ndjson")
                lines = [json.loads(line) for line in r.text.splitlines()]
                assert [set(x) for x in lines[:-1]] == [{"delta"}] * (len(lines) - 1)
                assert lines[-1]["done"] is True and lines[-1]["usage"]["completion_tokens"] == 3
                r = await http.post("/playground/stream", data={
                    **form, "prompt": " ", "csrf_token": csrf_of(page.text)})
                assert r.status_code == 422 and "Write a prompt" in r.json()["error"]["message"]
                async with swarm.client() as stranger:
                    r = await stranger.post("/playground/stream", data=form)
                    assert r.status_code == 401


async def test_login_throttling_and_errors_read_well(tmp_path: Path,
                                                     nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        async with web_swarm(nursery, tmp_path, auth={"max_failures_per_account": 2}) as swarm:
            await swarm.account("alice")
            async with swarm.client() as http:
                for expected in (401, 401, 429):
                    page = await http.get("/login")
                    r = await http.post("/login", data={"login": "alice",
                                                        "password": "not my password",
                                                        "csrf_token": csrf_of(page.text)})
                    assert r.status_code == expected
                assert "Too many failed login attempts. Please wait" in r.text
                assert int(r.headers["retry-after"]) > 60
                assert 'value="alice"' in r.text  # the form keeps what was typed
                page = await http.get("/register")
                r = await http.post("/register", data={
                    "username": "alice", "email": "new@example.com", "password": PASSWORD,
                    "csrf_token": csrf_of(page.text)})
                assert r.status_code == 409 and "That username is taken" in r.text
                r = await http.post("/register", data={
                    "username": "bob1", "email": "bob@example.com", "password": "password",
                    "csrf_token": csrf_of(page.text)})
                assert r.status_code == 422 and 'aria-invalid="true"' in r.text


async def test_an_expired_access_token_is_renewed_from_the_refresh_cookie(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        async with web_swarm(nursery, tmp_path, auth={"token_ttl": 1, "clock_skew": 0}) as swarm:
            await swarm.account("alice")
            async with swarm.client() as http:
                await log_in(swarm, http, "alice")
                first = http.cookies.get("p2p_session")
                await trio.sleep(2.1)  # the access token's lifetime is whole seconds
                r = await http.get("/dashboard")
                assert r.status_code == 200 and "Dashboard" in r.text
                renewed = [c for c in r.headers.get_list("set-cookie")
                           if c.startswith("p2p_session=")]
                assert renewed and http.cookies.get("p2p_session") != first


async def test_the_account_page_changes_the_password(tmp_path: Path,
                                                     nursery: trio.Nursery) -> None:
    """The form on /account: wrong, mismatched or weak input is refused on
    the page with the field marked; a change keeps this browser logged in
    (a new session) and ends the other browser's session; the REST route
    does the same for a bearer token."""
    new = "Another-l0ng-secret"
    with trio.fail_after(60):
        async with web_swarm(nursery, tmp_path) as swarm:
            await swarm.account("alice")
            async with swarm.client() as http, swarm.client() as other:
                await log_in(swarm, http, "alice")
                await log_in(swarm, other, "alice")
                page = await http.get("/account")
                assert 'id="password"' in page.text
                token = csrf_of(page.text)
                for form, status, marked in (
                        ({"current_password": "not my password", "new_password": new,
                          "confirm_password": new}, 401, "current_password"),
                        ({"current_password": PASSWORD, "new_password": new,
                          "confirm_password": new + "x"}, 422, "confirm_password"),
                        ({"current_password": PASSWORD, "new_password": "short",
                          "confirm_password": "short"}, 422, "new_password")):
                    r = await http.post("/account/password", data={**form, "csrf_token": token})
                    assert r.status_code == status, r.text
                    assert re.search(rf'name="{marked}"[^>]*\s+aria-invalid="true"', r.text)
                r = await http.post("/account/password", data={
                    "current_password": PASSWORD, "new_password": new, "confirm_password": new})
                assert r.status_code == 403  # no CSRF token: refused
                r = await http.post("/account/password", data={
                    "current_password": PASSWORD, "new_password": new,
                    "confirm_password": new, "csrf_token": token})
                assert r.status_code == 303, r.text
                page = await http.get(r.headers["location"])
                assert page.status_code == 200 and "Your password was changed" in page.text

                async def ended() -> bool:
                    r = await other.get("/dashboard")
                    return r.status_code == 303 and "/login" in r.headers["location"]

                await wait_for(ended, limit=10)
                assert (await http.get("/dashboard")).status_code == 200  # still logged in
                r = await http.post("/api/auth/login", json={"username": "alice",
                                                             "password": PASSWORD})
                assert r.status_code == 401
                r = await http.post("/api/auth/login", json={"username": "alice",
                                                             "password": new})
                assert r.status_code == 200
                bearer = {"Authorization": f"Bearer {r.json()['token']}"}
                r = await http.post("/api/auth/password", headers=bearer, json={
                    "current_password": new, "new_password": PASSWORD})
                assert r.status_code == 200 and r.json()["token"]
                r = await http.get("/api/auth/me", headers=bearer)
                assert r.status_code == 401
                assert r.json()["error"]["data"]["reason"] == "sessions_ended"

                # "log out everywhere" on the page ends this browser's session too
                async with swarm.client() as third:
                    await log_in(swarm, third, "alice")
                    page = await http.get("/account")
                    assert page.status_code == 303  # the REST change above ended it
                    await log_in(swarm, http, "alice")
                    page = await http.get("/account")
                    assert 'action="/account/logout-all"' in page.text
                    r = await http.post("/account/logout-all", data={"csrf_token": "forged"})
                    assert r.status_code == 403  # CSRF
                    r = await http.post("/account/logout-all",
                                        data={"csrf_token": csrf_of(page.text)})
                    assert r.status_code == 303 and r.headers["location"] == "/login?ended=all"
                    page = await http.get("/login?ended=all")
                    assert "Every session of your account has ended" in page.text
                    for browser in (http, third):
                        r = await browser.get("/dashboard")
                        assert r.status_code == 303 and "/login" in r.headers["location"]


def test_pure_helpers() -> None:
    assert credentials_from_headers({"authorization": "Bearer p2p_x"}) == {"api_key": "p2p_x"}
    assert credentials_from_headers({"authorization": "Bearer eyJ"}) == {"token": "eyJ"}
    # Basic: the key as the password (what a URL's user:key@ sends)
    assert credentials_from_headers({"authorization": "Basic cDJwOnAycF9r"}) == \
        {"api_key": "p2p_k"}
    # the first credential of a kind the route accepts
    both = {"x-api-key": "p2p_k", "authorization": "Bearer eyJ"}
    assert credentials_from_headers(both, allow=("token",)) == {"token": "eyJ"}
    assert credentials_from_headers(both) == {"api_key": "p2p_k"}
    assert method_label("DELETE", "/api/auth/api-keys/{key_id}") == \
        "DELETE:/api/auth/api-keys/:key_id"
    assert method_label("BREW", None) == "OTHER:_unmatched"
    days = day_range(3)
    svg = bar_chart([(d, i * 10) for i, d in enumerate(days)], title="<t>")
    assert svg.count("<rect") == 3 and "&lt;t&gt;" in svg and "style=" not in svg
    assert "&lt;b&gt;" in hbar_chart([("<b>", 5)], title="x")
