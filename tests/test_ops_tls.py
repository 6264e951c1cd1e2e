"""HTTPS on the web role: a node with a self-signed certificate serves TLS;
the SDK, httpx and the CLI talk to it with the CA file and refuse it
without (or with another CA); plain HTTP redirects to HTTPS; cookies are
Secure and HSTS is sent; bad certificate settings are config errors."""

from __future__ import annotations

import os
import ssl
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from p2pinfer.client import Client
from p2pinfer.config import NodeConfig
from p2pinfer.errors import ConfigError, PeerUnavailable
from p2pinfer.transports.http import unreachable_reason
from p2pinfer.web import WebSettings
from p2pinfer.web.tls import RedirectToHttps, check_pair, make_self_signed

from .test_web_support import web_swarm

P2PINFER = str(Path(sys.executable).parent / "p2pinfer")


def trust(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    done = await trio.run_process([P2PINFER, *args], capture_stdout=True, capture_stderr=True,
                                  check=False, env={**os.environ, **(env or {})})
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


async def test_https_with_a_generated_certificate_and_the_ca_file(
        tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(90):
        async with web_swarm(nursery, tmp_path, web={
                "tls_self_signed": True, "tls_hosts": ["p2pinfer.test"],
                "redirect_port": 0}) as swarm:
            web = swarm.web
            home = swarm.node.config.home
            ca = home / "tls" / "ca.pem"
            assert web.tls and swarm.url.startswith("https://127.0.0.1:")
            assert swarm.node.descriptor().info["web"] == {"port": web.port, "tls": True}
            for name in ("key.pem", "ca.key"):
                assert (home / "tls" / name).stat().st_mode & 0o077 == 0
            async with httpx.AsyncClient(base_url=swarm.url, verify=trust(ca)) as http:
                r = await http.get("/api/health")
                assert r.status_code == 200
                assert r.headers["strict-transport-security"].startswith("max-age=")
                # cookies set over HTTPS are Secure (the CSRF cookie of any page)
                r = await http.get("/login")
                assert r.status_code == 200
                assert "secure" in r.headers["set-cookie"].lower()
                # an account, made over HTTPS
                r = await http.post("/api/auth/register", json={
                    "username": "alice", "email": "alice@example.com",
                    "password": "correct horse battery staple"})
                assert r.status_code == 201, r.text
                r = await http.post("/api/auth/login", json={
                    "username": "alice", "password": "correct horse battery staple"})
                token = r.json()["token"]
                r = await http.post("/api/auth/api-keys", json={"name": "tls"},
                                    headers={"Authorization": f"Bearer {token}"})
                api_key = r.json()["api_key"]

            # the SDK with the CA file: as an argument, and from P2PINFER_CA_FILE
            async with Client(base_url=swarm.url, api_key=api_key, verify=str(ca)) as client:
                answer = await client.inference(prompt="Hello over TLS", model="fake")
                assert answer.usage["completion_tokens"] == 6
            monkeypatch.setenv("P2PINFER_CA_FILE", str(ca))
            async with Client(base_url=swarm.url, api_key=api_key) as client:
                assert [m["name"] for m in await client.models()] == ["fake"]
            monkeypatch.delenv("P2PINFER_CA_FILE")

            # the CLI: --ca-file, then the environment variable
            code, out = await cli("models", "--json", "--url", swarm.url, "--api-key", api_key,
                                  "--ca-file", str(ca), "--timeout", "20")
            assert code == 0 and '"fake"' in out, out
            code, out = await cli("models", "--url", swarm.url, "--api-key", api_key,
                                  "--timeout", "20", env={"P2PINFER_CA_FILE": str(ca)})
            assert code == 0 and "fake" in out, out

            # plain HTTP is only a redirect to the same path over HTTPS
            assert web.redirect_url is not None and web.redirect_url.startswith("http://")
            async with httpx.AsyncClient(verify=trust(ca)) as http:
                r = await http.get(f"{web.redirect_url}/api/health?x=1")
                assert r.status_code == 308
                assert r.headers["location"] == f"https://127.0.0.1:{web.port}/api/health?x=1"
                r = await http.get(f"{web.redirect_url}/api/health", follow_redirects=True)
                assert r.status_code == 200 and str(r.url).startswith("https://")
                r = await http.post(f"{web.redirect_url}/api/auth/login", json={})
                assert r.status_code == 308  # POSTs are not answered over plain HTTP


async def test_clients_refuse_an_untrusted_certificate(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    other = make_self_signed(tmp_path / "other-ca")  # a CA that did not sign the node's
    assert other.ca is not None
    with trio.fail_after(90):
        async with web_swarm(nursery, tmp_path, web={"tls_self_signed": True}) as swarm:
            # httpx with the system's CAs, and with the wrong CA
            for verify in (True, ssl.create_default_context(cafile=str(other.ca))):
                async with httpx.AsyncClient(verify=verify) as http:
                    with pytest.raises(httpx.ConnectError) as caught:
                        await http.get(f"{swarm.url}/api/health")
                    assert "CERTIFICATE_VERIFY_FAILED" in unreachable_reason(caught.value)
            # the SDK checks by default: no answer from a node it cannot verify
            async with Client(base_url=swarm.url, api_key="p2p_x_y") as client:
                with pytest.raises(PeerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                    await client.health()
            async with Client(base_url=swarm.url, api_key="p2p_x_y",
                              verify=str(other.ca)) as client:
                with pytest.raises(PeerUnavailable, match="certificate"):
                    await client.models()
            # and the CLI: "unreachable" (exit 5) with the reason
            code, out = await cli("models", "--url", swarm.url, "--api-key", "p2p_x_y",
                                  "--timeout", "20", env={"P2PINFER_CA_FILE": ""})
            assert code == 5 and "certificate" in out.lower(), out
            # a plain-HTTP client gets nothing from the TLS port
            async with httpx.AsyncClient() as http:
                with pytest.raises(httpx.HTTPError):
                    await http.get(swarm.url.replace("https://", "http://") + "/api/health")


def test_certificate_settings_and_checks(tmp_path: Path) -> None:
    files = make_self_signed(tmp_path / "tls", ["10.1.2.3", "box.lan"])
    check_pair(files.cert, files.key)
    context = ssl.create_default_context(cafile=str(files.ca))
    assert context.get_ca_certs()[0]["subject"]  # the CA loads as a trust anchor
    other = make_self_signed(tmp_path / "other")
    with pytest.raises(ConfigError, match="web.tls_cert: cannot use"):
        check_pair(files.cert, other.key)
    with pytest.raises(ConfigError, match="web.tls_key: no such file"):
        check_pair(files.cert, tmp_path / "missing.pem")

    def settings(table: dict[str, Any], env: dict[str, str] | None = None) -> WebSettings:
        return WebSettings.from_config(NodeConfig.from_mapping(
            {"node": {"home": str(tmp_path)}, "web": table}, env=env or {}))

    s = settings({}, env={"P2PINFER_TLS_CERT": "tls/cert.pem", "P2PINFER_TLS_KEY":
                          str(files.key), "P2PINFER_HTTP_REDIRECT_PORT": "8080"})
    assert s.tls and s.tls_cert == files.cert and s.redirect_port == 8080
    assert not settings({}).tls and settings({}).redirect_port is None
    with pytest.raises(ConfigError, match="web.tls_key: give both"):
        settings({"tls_cert": "x.pem"})
    with pytest.raises(ConfigError, match="web.redirect_port: redirects to HTTPS"):
        settings({"redirect_port": 80})


def test_redirect_locations() -> None:
    r = RedirectToHttps(8443)
    assert r.location("box.lan:8080", "/a/b", "q=1") == "https://box.lan:8443/a/b?q=1"
    assert r.location("[::1]:80", "/", "") == "https://[::1]:8443/"
    assert r.location("", "//evil.example/x", "") == "https://localhost:8443/"
    assert RedirectToHttps(443).location("box.lan", "/x", "") == "https://box.lan/x"
