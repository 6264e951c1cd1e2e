"""The dashboard in a real browser: Debian's Chromium driven by Playwright
(``executable_path``; Playwright downloads no browser).

One person's visit, end to end on a real node (auth, gateway, inference
with the synthetic model and the real embedded SmolLM2, metrics, web):
register, log in, create an API key and see it once, use it, run a prompt
with the real model in the playground, watch the dashboard's usage change,
look at the system page, revoke the key and see it refused. Screenshots go
to ``test-artifacts/web-browser/``.

Needs ``chromium`` (apt) at /usr/bin/chromium; skipped without it.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from .test_web_support import FAKE, PASSWORD, artifact_dir, web_swarm

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
SMOLLM2 = {"name": "smollm2", "backend": "llamacpp", "slots": 1, "aliases": ["default"]}

pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                                reason="needs Debian's chromium (apt-get install chromium)")


def visit(url: str, shots: Path, make_admin: Callable[[str], None]) -> dict[str, Any]:
    """What a person does in the browser (runs in a worker thread: the
    Playwright sync API blocks, the node keeps serving on trio).
    ``make_admin(username)`` has the operator make that user an admin."""
    from playwright.sync_api import expect, sync_playwright

    seen: dict[str, Any] = {}
    step = iter(range(1, 100))

    def shot(page: Any, name: str) -> None:
        page.screenshot(path=str(shots / f"{next(step):02d}-{name}.png"), full_page=True)

    with tempfile.TemporaryDirectory(prefix="p2pinfer-chromium-") as profile, \
            sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 860})
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(url + "/")
            expect(page.locator("h1")).to_contain_text("Share language models")
            shot(page, "landing")

            # register, then log in
            page.click("text=Create an account")
            page.fill("input[name=username]", "grace")
            page.fill("input[name=email]", "grace@example.com")
            page.fill("input[name=password]", "short")
            page.click("button[type=submit]")
            expect(page.locator(".error")).to_contain_text("at least 10")
            shot(page, "register-weak-password")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            expect(page).to_have_url(re.compile(r"/login\?registered=grace$"))
            expect(page.locator(".notice")).to_contain_text("Account created")
            expect(page.locator("input[name=login]")).to_have_value("grace")
            page.fill("input[name=password]", PASSWORD)
            shot(page, "login")
            page.click("button[type=submit]")
            expect(page).to_have_url(url + "/dashboard")
            expect(page.locator("#total-requests")).to_have_text("0")
            expect(page.locator(".who")).to_have_text("grace")
            shot(page, "dashboard-empty")

            # create a key: shown once
            page.click("nav >> text=API keys")
            page.fill("input[name=name]", "laptop")
            page.click("text=Create key")
            key = page.locator("#new-key-value").inner_text().strip()
            assert key.startswith("p2p_"), key
            shot(page, "api-key-created")
            page.goto(url + "/api-keys")
            expect(page.locator("#keys .key-name")).to_have_text(["laptop"])
            assert key not in page.content()
            seen["key"] = key

            # the key works from a program
            with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60) as http:
                for _ in range(2):
                    r = http.post("/api/inference", json={"prompt": "hello", "model": "fake"})
                    assert r.status_code == 200, r.text

            # the playground with the real embedded model
            page.click("nav >> text=Playground")
            # an answer of a few sentences: a one-line one is two or three of
            # the runner's 50 ms chunks, too few to see it grow
            page.fill("textarea[name=prompt]",
                      "Write a long story about a trip to Paris, the capital of France.")
            page.select_option("select[name=model]", "smollm2")
            page.fill("input[name=max_tokens]", "64")
            page.fill("input[name=temperature]", "0")
            # the page's script streams the answer: record every text the
            # answer shows on the way (a whole answer at once would be one)
            page.evaluate("""() => {
                window.__texts = [];
                const out = document.querySelector('#answer .answer');
                new MutationObserver(() => window.__texts.push(out.textContent))
                    .observe(out, {childList: true, characterData: true, subtree: true});
            }""")
            page.click("text=Run")
            answer = page.locator("#answer .answer")
            meta = page.locator("#answer .meta")
            expect(meta).to_contain_text("finish:", timeout=90_000)
            expect(page).to_have_url(url + "/playground")  # no page load: it streamed
            seen["answer"] = answer.inner_text()
            seen["answer_meta"] = meta.inner_text()
            seen["partial_texts"] = [t for t in page.evaluate("window.__texts")
                                     if t and t != seen["answer"]]
            shot(page, "playground-real-model")

            # the dashboard shows the usage (the gateway flushes it to the ledger)
            page.click("nav >> text=Dashboard")
            for _ in range(100):
                if page.locator("#total-requests").inner_text() == "3":
                    break
                page.wait_for_timeout(200)
                page.reload()
            expect(page.locator("#total-requests")).to_have_text("3")
            expect(page.locator("#per-key")).to_contain_text("laptop")
            expect(page.locator("#per-key")).to_contain_text("browser session")
            expect(page.locator("#recent tbody tr")).to_have_count(3)
            expect(page.locator("#quota")).to_contain_text("Requests: 3 of 100")
            seen["bars"] = page.locator("svg.chart rect.bar").count()
            shot(page, "dashboard-with-usage")

            # the system page
            page.click("nav >> text=System")
            # the member list is the operator's view: an admin's, not grace's
            expect(page.locator("#members")).to_contain_text("shown to admins")
            assert "this node" not in page.locator("main").inner_text()
            make_admin("grace")
            page.reload()
            expect(page.locator("#members")).to_contain_text("this node")
            expect(page.locator("#models")).to_contain_text("smollm2")
            expect(page.locator("#models")).to_contain_text("fake")
            seen["system"] = page.locator("main").inner_text()
            shot(page, "system")

            # revoke the key; it is refused from then on
            page.click("nav >> text=API keys")
            page.click("button:has-text('Revoke')")
            expect(page.locator(".notice")).to_contain_text("revoked")
            expect(page.locator("#keys")).to_contain_text("revoked")
            shot(page, "api-key-revoked")
            r = httpx.post(url + "/api/inference", headers={"X-API-Key": key},
                           json={"prompt": "hello", "model": "fake"})
            seen["after_revoke"] = (r.status_code, r.json()["error"]["type"])

            # the API reference, rendered from /openapi.json
            page.click("nav >> text=API docs")
            expect(page.locator("h1")).to_contain_text("p2pinfer web API")
            page.locator("details.op").first.click()
            shot(page, "api-docs")

            # change the password on the account page: this browser stays logged in
            page.goto(url + "/account")
            page.fill("input[name=current_password]", PASSWORD)
            page.fill("input[name=new_password]", PASSWORD + "-new")
            page.fill("input[name=confirm_password]", PASSWORD + "-new")
            page.click("button:has-text('Change password')")
            expect(page).to_have_url(re.compile(r"/account\?password=changed$"))
            expect(page.locator(".notice")).to_contain_text("Your password was changed")
            expect(page.locator(".who")).to_have_text("grace")
            shot(page, "password-changed")
            r = httpx.post(url + "/api/auth/login",
                           json={"username": "grace", "password": PASSWORD})
            seen["old_password"] = r.status_code

            # log out
            page.click("text=Log out")
            expect(page.locator("header .account")).to_contain_text("Log in")
            page.goto(url + "/dashboard")
            expect(page).to_have_url(re.compile(r"/login\?next=/dashboard$"))
        finally:
            browser.close()
    return seen


async def test_a_visit_in_a_real_browser(tmp_path: Path, nursery: trio.Nursery) -> None:
    shots = artifact_dir("web-browser")
    for old in shots.glob("*.png"):
        old.unlink()
    with trio.fail_after(240):
        async with web_swarm(nursery, tmp_path, models=[FAKE, SMOLLM2],
                             roles=("auth", "gateway", "inference", "metrics", "web"),
                             metrics={"prometheus_port": 0, "interval": 1}) as swarm:
            node = swarm.node

            async def promote(name: str) -> None:
                user = node.ledger.user_by_username(name)
                await node.rpc.call(node.peer_id, "setUserAdmin", {
                    "as_operator": True, "user_id": user.id, "is_admin": True})

            def make_admin(name: str) -> None:
                trio.from_thread.run(promote, name)

            seen = await trio.to_thread.run_sync(visit, swarm.url, shots, make_admin)
            ledger = swarm.node.ledger
            user = ledger.user_by_username("grace")
            keys = ledger.api_keys_of(user.id)
    assert [k.name for k in keys] == ["laptop"] and keys[0].revoked_at is not None
    assert seen["after_revoke"] == (401, "RevokedApiKey")
    assert "paris" in seen["answer"].lower(), seen["answer"]
    assert "smollm2" in seen["answer_meta"]
    assert len(seen["partial_texts"]) >= 3, seen["partial_texts"]  # it streamed
    assert seen["bars"] >= 28  # two 14-day charts and the per-key chart
    assert "Swarm health" in seen["system"]
    assert seen["old_password"] == 401
    assert len(list(shots.glob("*.png"))) == 11
