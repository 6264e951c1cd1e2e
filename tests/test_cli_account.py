"""``register``, ``login``, ``logout``, ``whoami`` and ``keys`` against a real
swarm (a hub and a synthetic worker in a background thread), peer-to-peer
and over HTTP, with their error paths."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest

from p2pinfer.cli.errors import EXIT_AUTH, EXIT_USAGE
from p2pinfer.cli.store import Credentials, CredentialStore

from .test_cli_main import DEAD_ADDR, cli_env, invoke  # noqa: F401 - cli_env is autouse
from .test_sdk import PASSWORD, BackgroundSwarm


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSwarm]:
    bg = BackgroundSwarm(tmp_path_factory.mktemp("cli-account")).start()
    try:
        yield bg
    finally:
        bg.stop()


def saved() -> Credentials:
    return CredentialStore().load()


def test_register_login_keys_logout(swarm: BackgroundSwarm) -> None:
    out = invoke("register", "--bootstrap", swarm.addr,
                 input="carol\ncarol@example.com\n" + f"{PASSWORD}\n{PASSWORD}\n").output
    assert "Registered carol" in out and "Logged in" in out
    creds = saved()
    assert creds.bootstrap == [swarm.addr] and creds.username == "carol" and creds.token
    assert os.stat(CredentialStore().path).st_mode & 0o777 == 0o600
    assert PASSWORD not in CredentialStore().path.read_text()  # never the password

    me = json.loads(invoke("whoami", "--json").stdout)  # the saved swarm and session
    assert me["username"] == "carol" and me["user_id"] == creds.user_id

    created = invoke("keys", "create", "--name", "laptop")
    key = created.stdout.strip()
    assert key.startswith("p2p_") and "shown this once" in created.stderr
    assert saved().api_key == key
    invoke("keys", "create", "--name", "spare", "--no-save")
    listed = invoke("keys", "list").stdout
    assert "laptop (cli)" in listed and "spare" in listed and key not in listed
    rows = json.loads(invoke("keys", "list", "--json").stdout)
    assert {r["name"] for r in rows} == {"laptop", "spare"}

    invoke("keys", "revoke", "spare")
    assert saved().api_key == key  # another key: the CLI's stays
    out = invoke("keys", "revoke", "laptop").output
    assert "forgotten here too" in out and saved().api_key is None
    again = invoke("keys", "revoke", rows[0]["key_id"]).output
    assert "already revoked" in again
    invoke("keys", "revoke", "no-such-key", code=EXIT_USAGE)

    out = invoke("logout").output
    assert "Logged out" in out and saved().token is None
    out = invoke("whoami", code=EXIT_AUTH).output
    assert "not logged in" in out
    invoke("keys", "create", code=EXIT_AUTH)


def test_login_errors_and_options(swarm: BackgroundSwarm) -> None:
    swarm.account("dave", key=False)
    out = invoke("login", "dave", "--password", "not the password 1", "--bootstrap",
                 swarm.addr, code=EXIT_AUTH).output
    assert "wrong username or password" in out
    assert saved().token is None  # nothing saved on failure
    out = invoke("login", "nobody", "--password", PASSWORD, "--bootstrap", swarm.addr,
                 code=EXIT_AUTH).output
    assert "p2pinfer register" in out
    # by email, password from the environment, with a key for the CLI
    out = invoke("login", "dave@example.com", "--create-key", "--bootstrap", swarm.addr,
                 env={"P2PINFER_PASSWORD": PASSWORD}).output
    assert "Logged in as dave" in out and "created and saved" in out
    assert saved().api_key and saved().username == "dave"
    # logging in as someone else drops the previous user's key
    swarm.account("erin", key=False)
    invoke("login", "erin", "--password", PASSWORD)
    assert saved().username == "erin" and saved().api_key is None


def test_register_refusals(swarm: BackgroundSwarm) -> None:
    out = invoke("register", "-u", "frank", "-e", "frank@example.com", "--password", "short",
                 "--bootstrap", swarm.addr, code=EXIT_USAGE).output
    assert "Error" in out and "password" in out.lower()
    invoke("register", "-u", "frank", "-e", "frank@example.com", "--password", PASSWORD,
           "--bootstrap", swarm.addr, "--no-login")
    assert saved().token is None
    out = invoke("register", "-u", "frank", "-e", "frank2@example.com", "--password",
                 PASSWORD, "--bootstrap", swarm.addr, code=1).output
    assert "frank" in out and "taken" in out.lower()


def test_a_revoked_key_is_refused_with_a_clear_message(swarm: BackgroundSwarm) -> None:
    user = swarm.account("grace")
    swarm.call("revokeApiKey", {"token": user["token"], "key_id": user["key_id"]})
    out = invoke("models", "--bootstrap", swarm.addr, "--api-key", user["api_key"],
                 code=EXIT_AUTH).output
    assert "revoked" in out and "keys create" in out
    out = invoke("models", "--bootstrap", swarm.addr, "--api-key", "p2p_garbage",
                 code=EXIT_AUTH).output
    assert "not valid" in out


def test_an_expiring_session_is_refreshed_and_saved(swarm: BackgroundSwarm) -> None:
    user = swarm.account("heidi", key=False)
    store = CredentialStore()
    store.save(Credentials(bootstrap=[swarm.addr], username="heidi", user_id=user["user_id"],
                           token=user["token"], refresh_token=user["refresh_token"],
                           expires_at=time.time() + 5))  # within the refresh margin
    invoke("whoami")
    renewed = saved()
    assert renewed.token != user["token"] and renewed.refresh_token != user["refresh_token"]
    assert renewed.expires_at is not None and renewed.expires_at > time.time() + 600
    # the spent refresh token is refused if presented again (rotation)
    out = invoke("logout").output
    assert "Logged out" in out


def test_saved_credentials_never_go_to_another_swarm(swarm: BackgroundSwarm) -> None:
    user = swarm.account("ivan")
    CredentialStore().save(Credentials(bootstrap=[swarm.addr], api_key=user["api_key"],
                                       token=user["token"]))
    invoke("models")  # the saved swarm: the saved key is used
    out = invoke("models", "--bootstrap", DEAD_ADDR, code=EXIT_AUTH).output
    assert "not logged in" in out  # refused locally, before any connection


def test_logout_without_the_swarm_still_forgets_the_session(swarm: BackgroundSwarm) -> None:
    user = swarm.account("judy", key=False)
    CredentialStore().save(Credentials(bootstrap=[DEAD_ADDR], token=user["token"],
                                       refresh_token=user["refresh_token"], api_key="p2p_k"))
    out = invoke("logout", "--timeout", "5").output
    assert "Could not reach the swarm" in out and "Logged out" in out
    assert saved().token is None and saved().api_key == "p2p_k"
    invoke("logout", code=EXIT_AUTH)


def test_the_same_commands_over_http(swarm: BackgroundSwarm) -> None:
    invoke("register", "-u", "kim", "-e", "kim@example.com", "--password", PASSWORD,
           "--url", swarm.url)
    assert saved().url == swarm.url and saved().bootstrap == []
    key = invoke("keys", "create", "--name", "web").stdout.strip()
    assert key.startswith("p2p_")
    assert "web (cli)" in invoke("keys", "list").stdout
    assert json.loads(invoke("whoami", "--json").stdout)["username"] == "kim"
    invoke("login", "kim", "--password", "wrong password 123", code=EXIT_AUTH)
    invoke("logout")


@pytest.mark.parametrize("over", ["p2p", "http"])
def test_password_change(swarm: BackgroundSwarm, over: str) -> None:
    """``p2pinfer account password``: a wrong current password or a weak new one
    changes nothing; a change saves the new session, and the old password
    and sessions are refused, peer-to-peer and over HTTP."""
    name = f"pat{over}"
    where = ["--bootstrap", swarm.addr] if over == "p2p" else ["--url", swarm.url]
    invoke("register", "-u", name, "-e", f"{name}@example.com", "--password", PASSWORD,
           *where)
    before = saved()
    new = "n3w-and-l0nger-pass"
    out = invoke("account", "password", "--current", "not the password 1", "--new", new,
                 code=EXIT_AUTH).output
    assert "wrong" in out
    out = invoke("account", "password", "--current", PASSWORD, "--new", "short",
                 code=EXIT_USAGE).output
    assert "at least" in out
    out = invoke("account", "password", input=f"{PASSWORD}\n{new}\n{new}\n").output
    assert "Password changed" in out
    after = saved()
    assert after.token and after.token != before.token and after.username == name
    assert json.loads(invoke("whoami", "--json").stdout)["username"] == name
    # the session from before the change is over, everywhere
    CredentialStore().save(Credentials(bootstrap=before.bootstrap, url=before.url,
                                       token=before.token, refresh_token=before.refresh_token))
    assert "session" in invoke("whoami", code=EXIT_AUTH).output.lower()
    invoke("login", name, "--password", PASSWORD, code=EXIT_AUTH)
    invoke("login", name, "--password", new)
    invoke("logout")


def test_logout_everywhere(swarm: BackgroundSwarm) -> None:
    """``p2pinfer logout --everywhere`` ends the other device's session too."""
    invoke("register", "-u", "wanda", "-e", "wanda@example.com", "--password", PASSWORD,
           "--bootstrap", swarm.addr)
    other_device = saved()
    invoke("login", "wanda", "--password", PASSWORD)  # a second session, this "device"
    assert saved().token != other_device.token
    out = invoke("logout", "--everywhere").output
    assert "Every session of the account has ended" in out and saved().token is None
    CredentialStore().save(Credentials(bootstrap=other_device.bootstrap,
                                       token=other_device.token,
                                       refresh_token=other_device.refresh_token))
    assert "session" in invoke("whoami", code=EXIT_AUTH).output.lower()
    invoke("login", "wanda", "--password", PASSWORD)
    assert json.loads(invoke("whoami", "--json").stdout)["username"] == "wanda"
    invoke("logout")
