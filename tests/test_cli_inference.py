"""``prompt``, ``chat`` and ``models`` against a real swarm (a hub and a
synthetic worker: answers are deterministic and counted exactly)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from p2pinfer.cli.errors import EXIT_LIMIT, EXIT_USAGE
from p2pinfer.cli.store import Credentials, CredentialStore
from p2pinfer.client import SyncClient

from .test_cli_main import cli_env, invoke  # noqa: F401 - cli_env is autouse
from .test_sdk import FAKE, BackgroundSwarm

RATE_LIMIT = 12


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSwarm]:
    bg = BackgroundSwarm(tmp_path_factory.mktemp("cli-inference"), tokens=6,
                         rate_limit=RATE_LIMIT).start()
    try:
        yield bg
    finally:
        bg.stop()


def login_as(swarm: BackgroundSwarm, name: str) -> dict[str, str]:
    user = swarm.account(name)
    CredentialStore().save(Credentials(bootstrap=[swarm.addr], username=name,
                                       api_key=user["api_key"], api_key_id=user["key_id"],
                                       token=user["token"],
                                       refresh_token=user["refresh_token"]))
    return user


def reference(swarm: BackgroundSwarm, api_key: str, **request: object) -> str:
    """The answer to ``request``, asked through the SDK."""
    with SyncClient(bootstrap=[swarm.addr], api_key=api_key) as client:
        return client.inference(**request).text  # type: ignore[arg-type]


def test_prompt_prints_the_answer_and_its_metadata(swarm: BackgroundSwarm) -> None:
    user = login_as(swarm, "pia")
    expected = reference(swarm, user["api_key"], prompt="Name three colors.", model=FAKE)
    out = invoke("prompt", "Name three colors.")  # default model, saved key and swarm
    assert out.stdout == expected + "\n"
    out = invoke("prompt", "-v", "--max-tokens", "2", "-m", FAKE, "Name three colors.")
    assert len(out.stdout.split()) == 2
    assert "0 prompt" not in out.stderr and "2 completion tokens" in out.stderr
    data = json.loads(invoke("prompt", "--json", "Name three colors.").stdout)
    assert data["text"] == expected and data["usage"]["completion_tokens"] == 6
    assert data["worker"] == swarm.swarm.nodes["worker-1"].peer_id and data["request_id"]
    # the prompt from stdin, with '-' or piped without an argument
    assert invoke("prompt", "-", input="Name three colors.").stdout == expected + "\n"
    assert invoke("prompt", input="Name three colors.").stdout == expected + "\n"
    system = invoke("prompt", "-s", "Be brief.", "Name three colors.").stdout
    assert system != expected + "\n"  # the system prompt reached the model
    invoke("prompt", "   ", code=EXIT_USAGE)
    # an explicit key, or the session token when no key is saved
    assert invoke("prompt", "--api-key", user["api_key"], "--bootstrap", swarm.addr,
                  "Name three colors.").stdout == expected + "\n"
    CredentialStore().save(Credentials(bootstrap=[swarm.addr], token=user["token"]))
    assert invoke("prompt", "Name three colors.").stdout == expected + "\n"


def test_rate_limited_exits_4_and_says_when_to_retry(swarm: BackgroundSwarm) -> None:
    user = login_as(swarm, "quinn")
    with SyncClient(bootstrap=[swarm.addr], api_key=user["api_key"]) as client:
        for _ in range(RATE_LIMIT):
            client.inference("hi", model=FAKE)
    out = invoke("prompt", "one more", code=EXIT_LIMIT).output
    assert "rate limited" in out and "try again in" in out


def test_unknown_model_names_the_fix(swarm: BackgroundSwarm) -> None:
    user = login_as(swarm, "rosa")
    out = invoke("prompt", "--url", swarm.url, "--api-key", user["api_key"], "-m", "nope",
                 "hi", code=1).output
    assert "nope" in out and "p2pinfer models" in out


def test_chat_keeps_the_conversation(swarm: BackgroundSwarm) -> None:
    user = login_as(swarm, "sam")
    first = reference(swarm, user["api_key"], messages=[{"role": "user", "content": "Hello"}])
    out = invoke("chat", input="Hello\nHello\n/reset\nHello\n/help\n/exit\nnot sent\n")
    answers = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    assert answers[0] == first.strip()
    assert answers[1] != answers[0]  # the second turn carried the first one
    assert answers[2] == answers[0]  # /reset started over
    assert len(answers) == 3 and "/exit" in out.stderr  # /help, then nothing after /exit
    # Ctrl-D ends the chat too; a failing turn is reported and the chat goes on
    out = invoke("chat", "-m", "nope", "--url", swarm.url, "--api-key", user["api_key"],
                 input="Hi\n")
    assert "Error:" in out.stderr and "p2pinfer models" in out.stderr


def test_models(swarm: BackgroundSwarm) -> None:
    login_as(swarm, "tara")
    out = invoke("models").stdout
    assert FAKE in out and "synthetic" in out and "default" in out
    (model,) = json.loads(invoke("models", "--json").stdout)
    assert model["name"] == FAKE and model["workers"] == 1 and model["status"] == "loaded"
    assert model["runners"] == []  # a synthetic model has no runner process
