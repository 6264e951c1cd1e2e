"""Token log probabilities (``logprobs``, ``top_logprobs``): classifiers,
confidence scores and evaluation harnesses ask for them. Against one node
serving the embedded SmolLM2 through the real llama.cpp runner, with the
``openai`` package (whole and streamed), the SDK (libp2p and HTTP) and the
CLI: the tokens spell the answer, each with at most the alternatives asked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import openai
import pytest
import trio

from p2pinfer import errors
from p2pinfer.cli.store import Credentials, CredentialStore
from p2pinfer.client import SyncClient
from p2pinfer.prompts import parse_prompt_params, token_logprobs

from .test_cli_main import cli_env, invoke  # noqa: F401 - cli_env is autouse
from .test_sdk import BackgroundSwarm
from .test_structured_output import SMOLLM2, openai_client, swarm  # noqa: F401 - fixture
from .test_web_support import FAKE, web_swarm

ASK = [{"role": "user", "content": "Name three colors."}]


def check(entries: list[Any], text: str, top: int) -> None:
    """The tokens spell ``text``; each has a log probability and ``top``
    alternatives, the chosen one (greedy) first among them."""
    def get(entry: Any, key: str) -> Any:
        return entry[key] if isinstance(entry, dict) else getattr(entry, key)

    assert entries and "".join(get(e, "token") for e in entries) == text
    for entry in entries:
        assert get(entry, "logprob") <= 0 and math.isfinite(get(entry, "logprob"))
        alternatives = get(entry, "top_logprobs")
        assert len(alternatives) == top
        if top:
            assert get(alternatives[0], "token") == get(entry, "token")


def test_the_logprobs_contract() -> None:
    req = parse_prompt_params({"prompt": "x", "logprobs": True, "top_logprobs": 3})
    assert req.needs == {"chat", "logprobs"} and req.params.top_logprobs == 3
    for params, field in (({"top_logprobs": 2}, "top_logprobs"),
                          ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                          ({"logprobs": "yes"}, "logprobs"),
                          ({"logprobs": True, "raw": True}, "logprobs"),
                          ({"logprobs": True, "tools": [{"name": "f"}]}, "logprobs")):
        with pytest.raises(errors.InvalidParams) as info:
            parse_prompt_params({"prompt": "x", **params})
        assert info.value.data["field"] == field
    # what a backend reports is kept to the documented keys and types
    assert token_logprobs([{"id": 5, "token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                            "top_logprobs": [{"token": "Hi", "logprob": -0.5, "id": 5}]},
                           {"token": 3, "logprob": -1}, "junk"]) == [
        {"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
         "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": None}]}]


async def test_the_openai_package_gets_logprobs(tmp_path: Path,
                                                nursery: trio.Nursery) -> None:
    with trio.fail_after(300):
        async with web_swarm(nursery, tmp_path, models=(SMOLLM2, FAKE)) as swarm:
            alice = await swarm.account("alice")
            client = openai_client(swarm.url, alice.api_key)

            def session() -> dict[str, Any]:
                out: dict[str, Any] = {"errors": []}
                out["whole"] = client.chat.completions.create(
                    model="smollm2", messages=ASK, max_tokens=12, temperature=0,
                    logprobs=True, top_logprobs=2)
                out["streamed"] = list(client.chat.completions.create(
                    model="smollm2", messages=ASK, max_tokens=12, temperature=0,
                    logprobs=True, stream=True))
                out["plain"] = client.chat.completions.create(
                    model="smollm2", messages=ASK, max_tokens=4, temperature=0)
                for call in (
                    lambda: client.chat.completions.create(
                        model="fake", messages=ASK, logprobs=True),
                    lambda: client.chat.completions.create(
                        model="smollm2", messages=ASK, top_logprobs=2),
                    lambda: client.completions.create(model="smollm2", prompt="x",
                                                      logprobs=2),
                ):
                    try:
                        call()
                    except openai.APIStatusError as exc:
                        out["errors"].append(exc)
                return out

            got = await trio.to_thread.run_sync(session)

    whole = got["whole"].choices[0]
    check(whole.logprobs.content, whole.message.content, 2)
    pieces = [c.choices[0] for c in got["streamed"] if c.choices]
    text = "".join(p.delta.content or "" for p in pieces)
    scores = [e for p in pieces if p.logprobs for e in p.logprobs.content]
    check(scores, text, 0)
    assert text == whole.message.content  # greedy: the same answer either way
    assert got["plain"].choices[0].logprobs is None
    missing, alone, legacy = got["errors"]
    assert missing.status_code == 400 and missing.body["code"] == "missing_capability"
    assert "log probabilities" in missing.body["message"]
    assert alone.status_code == 400 and alone.body["param"] == "top_logprobs"
    assert legacy.status_code == 400 and legacy.body["param"] == "logprobs"


def test_the_sdk_and_the_cli_get_logprobs(swarm: BackgroundSwarm) -> None:  # noqa: F811
    user = swarm.account("lena")
    with SyncClient(bootstrap=[swarm.addr], api_key=user["api_key"]) as client:
        client.wait_for_model("smollm2")
        answer = client.inference("Name three colors.", model="smollm2", max_tokens=10,
                                  temperature=0, logprobs=True, top_logprobs=3)
        assert answer.logprobs is not None
        check(answer.logprobs, answer.text, 3)
        with client.stream("Name three colors.", model="smollm2", max_tokens=10,
                           temperature=0, logprobs=True) as stream:
            streamed = "".join(stream)
        assert stream.response is not None and stream.response.logprobs is not None
        check(stream.response.logprobs, streamed, 0)
        assert client.inference("Hi", model="smollm2", max_tokens=3).logprobs is None
    with SyncClient(base_url=swarm.url, api_key=user["api_key"]) as client:
        over_http = client.inference("Name three colors.", model="smollm2", max_tokens=10,
                                     temperature=0, logprobs=True, top_logprobs=1)
        assert over_http.logprobs is not None
        check(over_http.logprobs, over_http.text, 1)

    CredentialStore().save(Credentials(bootstrap=[swarm.addr], username="lena",
                                       api_key=user["api_key"], api_key_id=user["key_id"]))
    data = json.loads(invoke("prompt", "-m", "smollm2", "--max-tokens", "6", "-t", "0",
                             "--json", "--logprobs", "2", "Name three colors.").stdout)
    check(data["logprobs"], data["text"], 2)
    out = invoke("prompt", "--logprobs", "2", "x", code=2)
    assert "--logprobs needs --json" in out.output
