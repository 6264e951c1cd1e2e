"""Embeddings: what RAG code sends first (``OpenAIEmbeddings``,
``OllamaEmbeddings``, ``litellm.embedding``), end to end.

One node serving the embedded models (SmolLM2 for chat, all-MiniLM-L6-v2 on
onnxruntime for embeddings) answers the official ``openai`` and ``ollama``
packages, the SDK and the CLI. The vectors are checked for what retrieval
relies on: one per text, in order, unit length, the same for the same text
whatever else is in the request, and closer for texts that mean the same.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import pytest
import trio

from p2pinfer import errors
from p2pinfer.cli.store import Credentials, CredentialStore
from p2pinfer.client import SyncClient
from p2pinfer.config import NodeConfig
from p2pinfer.inference.settings import InferenceSettings, build_models
from p2pinfer.prompts import parse_embed_params

from .helpers import wait_for
from .test_cli_main import cli_env, invoke  # noqa: F401 - cli_env is autouse
from .test_sdk import BackgroundSwarm
from .test_structured_output import openai_client
from .test_web_support import web_swarm

CAT, KITTEN, MARKET = ("The cat sits on the mat.", "A kitten is resting on a rug.",
                       "Stock markets fell sharply today.")
# a fixed set of paraphrase pairs: each sentence's nearest other sentence
# must be its paraphrase
PAIRS = [("How do I reset my password?", "I forgot my password and need a new one."),
         ("The train to Paris leaves at noon.", "At 12 o'clock the Paris train departs."),
         ("This soup is far too salty.", "There is way too much salt in the soup."),
         ("The server crashed during the night.", "Overnight, the machine went down.")]
MINILM = {"name": "all-minilm", "backend": "onnx"}


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def check_vectors(vectors: list[list[float]], n: int) -> None:
    assert len(vectors) == n
    for v in vectors:
        assert len(v) == 384 and math.isclose(dot(v, v), 1.0, abs_tol=1e-4)


def test_the_embed_contract() -> None:
    assert parse_embed_params({"input": "hi"}).texts == ("hi",)
    assert parse_embed_params({"input": ["a", "b"], "model": "all-minilm"}).model == "all-minilm"
    for params, field in (({"input": []}, "input"), ({"input": [""]}, "input[0]"),
                          ({"input": "x" * 40_000}, "input"), ({"input": [1]}, "input[0]"),
                          ({"input": ["a"] * 257}, "input"), ({"text": "a"}, "text"),
                          ({"input": "a", "model": "a b"}, "model"), ("hi", "params")):
        with pytest.raises(errors.InvalidParams) as info:
            parse_embed_params(params)
        assert info.value.data["field"] == field


def test_the_embedded_models_and_the_onnx_backend_config(tmp_path: Path) -> None:
    def models(tree: dict[str, Any]) -> list[tuple[str, str]]:
        config = NodeConfig.from_mapping({"node": {"home": str(tmp_path)}, **tree})
        entries = build_models(config.tree, InferenceSettings.from_config(config))
        return [(e.backend.name, e.backend.kind) for e in entries]

    # with no [[models]], a worker serves both embedded models
    assert models({}) == [("smollm2", "llamacpp"), ("all-minilm", "onnx")]
    assert models({"models": [MINILM]}) == [("all-minilm", "onnx")]
    for table, message in (
        ({**MINILM, "path": str(tmp_path / "none.onnx"),
          "tokenizer": str(tmp_path / "none.json")}, "no such file"),
        ({**MINILM, "tokenizer": __file__}, "give both path and tokenizer"),
        ({**MINILM, "n_ctx": 512}, "n_ctx"),
    ):
        with pytest.raises(errors.ConfigError, match=message):
            models({"models": [table]})


async def test_openai_and_ollama_clients_embed(tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(300):
        async with web_swarm(nursery, tmp_path, models=None) as swarm:
            alice = await swarm.account("alice")
            client = openai_client(swarm.url, alice.api_key)
            oll = ollama.Client(host=swarm.url, headers={"Authorization":
                                                         f"Bearer {alice.api_key}"})

            def session() -> dict[str, Any]:
                out: dict[str, Any] = {"errors": []}
                # the openai package asks for base64 unless told otherwise
                out["base64"] = client.embeddings.create(model="all-minilm",
                                                         input=[CAT, KITTEN, MARKET])
                out["float"] = client.embeddings.create(model="all-minilm-l6-v2", input=CAT,
                                                        encoding_format="float")
                out["embed"] = oll.embed(model="all-minilm", input=[MARKET, CAT])
                out["embeddings"] = oll.embeddings(model="all-minilm:latest", prompt=KITTEN)
                try:  # a chat model, in Ollama's error shape
                    oll.embed(model="smollm2", input="x")
                except ollama.ResponseError as exc:
                    out["ollama_refused"] = exc
                for call in (
                    lambda: client.embeddings.create(model="smollm2", input="x"),
                    lambda: client.embeddings.create(model="all-minilm", input=[[1, 2]]),
                    lambda: client.embeddings.create(model="all-minilm", input="x",
                                                     dimensions=64),
                    lambda: client.embeddings.create(model="nope", input="x"),
                    lambda: client.chat.completions.create(
                        model="all-minilm", messages=[{"role": "user", "content": "x"}]),
                ):
                    try:
                        call()
                    except Exception as exc:
                        out["errors"].append(exc)
                return out

            got = await trio.to_thread.run_sync(session)

            async def counted() -> int:
                usage = await swarm.node.rpc.call(swarm.node.peer_id, "getUsage",
                                                  {"auth": {"api_key": alice.api_key}})
                return sum(int(row["requests"]) for row in usage["usage"])

            async def at_least(n: int) -> bool:
                return await counted() >= n

            await wait_for(lambda: at_least(4), limit=20)
            await trio.sleep(1.5)
            requests = await counted()

    many = got["base64"]
    vectors = [item.embedding for item in many.data]
    check_vectors(vectors, 3)
    assert [item.index for item in many.data] == [0, 1, 2] and many.model == "all-minilm"
    assert many.usage.prompt_tokens == many.usage.total_tokens > 10
    cat, kitten, market = vectors
    assert dot(cat, kitten) > 0.5 > 0.2 > dot(cat, market)
    one = got["float"].data[0].embedding
    # a text's vector does not depend on what else was in the request
    assert max(abs(a - b) for a, b in zip(one, cat, strict=True)) < 1e-5
    market_again, cat_again = got["embed"].embeddings
    assert dot(cat_again, cat) > 0.9999 and dot(market_again, market) > 0.9999
    assert got["embed"].prompt_eval_count > 0
    assert dot(list(got["embeddings"].embedding), kitten) > 0.9999

    refused = got["ollama_refused"]
    assert refused.status_code == 400 and "cannot do embeddings" in refused.error
    chat_model, tokens, dims, unknown, not_chat = got["errors"]
    assert chat_model.status_code == 400 and chat_model.body["code"] == "missing_capability"
    assert "embeddings" in chat_model.body["message"]
    assert tokens.status_code == 400 and "token arrays" in tokens.body["message"]
    assert dims.status_code == 400 and dims.body["param"] == "dimensions"
    assert unknown.status_code == 404
    assert not_chat.status_code == 400 and not_chat.body["code"] == "missing_capability"
    assert "chat" in not_chat.body["message"]
    # every embedding request counted against the user, the refusals not
    assert requests == 4


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSwarm]:
    bg = BackgroundSwarm(tmp_path_factory.mktemp("embeddings"),
                         extra={"models": [MINILM, {"name": "fake", "backend": "synthetic",
                                                    "tokens": 4, "default": True}]}).start()
    try:
        yield bg
    finally:
        bg.stop()


def test_the_sdk_and_the_cli_embed(swarm: BackgroundSwarm) -> None:
    user = swarm.account("eddie")
    with SyncClient(bootstrap=[swarm.addr], api_key=user["api_key"]) as client:
        client.wait_for_model("all-minilm")
        result = client.embed([CAT, KITTEN])  # the gateway's default embedding model
        check_vectors(result.vectors, 2)
        assert result.model == "all-minilm" and result.usage["prompt_tokens"] > 0
        assert result.worker
        texts = [t for pair in PAIRS for t in pair]
        ranked = client.embed(texts).vectors
        for i, v in enumerate(ranked):
            nearest = max((j for j in range(len(texts)) if j != i),
                          key=lambda j: dot(v, ranked[j]))
            assert nearest == i ^ 1, (texts[i], texts[nearest])  # its own pair
        with pytest.raises(errors.MissingCapability) as info:
            client.embed("x", model="fake")
        assert info.value.data == {"capability": "embed", "model": "fake"}
        listed = {m["name"]: m["capabilities"] for m in client.models()}
        assert listed["all-minilm"] == ["embed"]
    with SyncClient(base_url=swarm.url, api_key=user["api_key"]) as client:
        over_http = client.embed(CAT)
        assert dot(over_http.vectors[0], result.vectors[0]) > 0.9999

    CredentialStore().save(Credentials(bootstrap=[swarm.addr], username="eddie",
                                       api_key=user["api_key"], api_key_id=user["key_id"]))
    lines = invoke("embed", CAT, MARKET).stdout.strip().splitlines()
    check_vectors([json.loads(line) for line in lines], 2)
    data = json.loads(invoke("embed", "--json", "-m", "all-minilm", KITTEN).stdout)
    check_vectors(data["embeddings"], 1)
    assert data["model"] == "all-minilm"
    out = invoke("embed", "-m", "fake", "x", code=2)
    assert "cannot do embeddings" in out.stderr
