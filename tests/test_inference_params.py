"""Pure parts of the inference role: parameter validation, stop sequences,
SSE decoding, cache keys and TTL, configuration errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pinfer import inference
from p2pinfer.config import NodeConfig
from p2pinfer.errors import ConfigError, InvalidParams, MalformedBackendResponse
from p2pinfer.inference.backend import GenerationParams, Message, StopMatcher
from p2pinfer.inference.cache import CachedAnswer, ResponseCache, cache_key
from p2pinfer.inference.remote import SSEDecoder
from p2pinfer.inference.settings import InferenceSettings, build_models
from p2pinfer.prompts import ParamLimits, parse_prompt_params, requested_model


def test_exports() -> None:
    assert sorted(inference.__all__) == sorted(
        name for name in dir(inference) if not name.startswith("_")
        and name not in {"annotations", "backend", "cache", "engine", "llamacpp", "metrics",
                         "ollama", "openai", "params", "remote", "role", "runner", "settings",
                         "slots", "synthetic", "toolcalls", "embedding"}
    )


# -- params ---------------------------------------------------------------------------
def test_prompt_defaults_and_forms() -> None:
    req = parse_prompt_params("hello")
    assert req.messages == (Message("user", "hello"),)
    assert req.model is None and req.use_cache and req.stream
    assert parse_prompt_params({"prompt": "x", "stream": False}).stream is False
    assert req.params == GenerationParams(max_tokens=256, temperature=0.7, top_p=0.95)
    req = parse_prompt_params({"prompt": "hi", "system": "be brief", "model": "llama3:8b",
                               "maxTokens": 5, "topP": 0.5, "stop": "\n", "seed": 7,
                               "cache": False})
    assert req.messages == (Message("system", "be brief"), Message("user", "hi"))
    assert req.model == "llama3:8b" and not req.use_cache
    assert req.params == GenerationParams(5, 0.7, 0.5, ("\n",), 7)
    assert req.params.deterministic
    # The design document's processPrompt(prompt, modelConfig) form.
    req = parse_prompt_params({"messages": [{"role": "user", "content": "x"}],
                               "modelConfig": {"model": "smollm2", "temperature": 0,
                                               "max_tokens": 3}})
    assert req.model == "smollm2" and req.params.temperature == 0
    assert req.params.max_tokens == 3 and req.params.deterministic


@pytest.mark.parametrize(
    "params, field",
    [
        (42, "params"),
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "a", "messages": []}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "name": "n"}]}, "messages[0].name"),
        ({"messages": [{"role": "user", "content": "x"}] * 65}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "system": "s"}, "system"),
        ({"prompt": "x" * 32_001}, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 4097}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "temperature": -0.1}, "temperature"),
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "temperature": float("nan")}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.01}, "top_p"),
        ({"prompt": "x", "stop": ["a"] * 5}, "stop"),
        ({"prompt": "x", "stop": [""]}, "stop[0]"),
        ({"prompt": "x", "stop": ["x" * 65]}, "stop[0]"),
        ({"prompt": "x", "stop": [1]}, "stop[0]"),
        ({"prompt": "x", "stop": 3}, "stop"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "seed": 2**32}, "seed"),
        ({"prompt": "x", "model": ""}, "model"),
        ({"prompt": "x", "model": "../../etc"}, "model"),
        ({"prompt": "x", "model": 5}, "model"),
        ({"prompt": "x", "cache": "yes"}, "cache"),
        ({"prompt": "x", "stream": "no"}, "stream"),
        ({"prompt": "x", "stream": 0}, "stream"),
        ({"prompt": "x", "temprature": 1}, "temprature"),
        ({"prompt": "x", "modelConfig": []}, "modelConfig"),
        ({"prompt": "x", "modelConfig": {"prompt": "y"}}, "modelConfig.prompt"),
        ({"prompt": "x", "temperature": 1, "modelConfig": {"temperature": 1}},
         "modelConfig.temperature"),
        ({"prompt": "x", "max_tokens": 1, "maxTokens": 1}, "maxTokens"),
    ],
)
def test_invalid_params_name_the_field(params: Any, field: str) -> None:
    with pytest.raises(InvalidParams) as ei:
        parse_prompt_params(params)
    assert ei.value.data["field"] == field
    assert ei.value.message.startswith(field + ":")


def test_limits_come_from_config() -> None:
    limits = ParamLimits(max_tokens=8, max_messages=1, max_prompt_chars=10)
    assert parse_prompt_params({"prompt": "x", "max_tokens": 8}, limits).params.max_tokens == 8
    with pytest.raises(InvalidParams, match="max_tokens"):
        parse_prompt_params({"prompt": "x", "max_tokens": 9}, limits)
    with pytest.raises(InvalidParams, match="prompt: at most 10"):
        parse_prompt_params({"prompt": "x" * 11}, limits)


# -- stop sequences -------------------------------------------------------------------
def test_stop_matcher_holds_back_partial_matches() -> None:
    m = StopMatcher(["END"])
    assert m.feed("abc E") == ("abc ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("Dxyz") == ("", True)
    assert m.flush() == ""
    m = StopMatcher(["END"])
    assert m.feed("xE") == ("x", False)
    assert m.feed("Nope") == ("ENope", False)
    m = StopMatcher(["END"])
    assert m.feed("tail E") == ("tail ", False)
    assert m.flush() == "E"


@given(
    text=st.text(alphabet="abXY\n", max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=10),
    stops=st.lists(st.text(alphabet="abXY\n", min_size=1, max_size=4), max_size=3),
)
def test_stop_matcher_equals_cutting_at_first_stop(text: str, cuts: list[int],
                                                   stops: list[str]) -> None:
    positions = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(positions, positions[1:], strict=False)]
    m = StopMatcher(stops)
    out = ""
    stopped = False
    for piece in pieces:
        emitted, stopped = m.feed(piece)
        out += emitted
        if stopped:
            break
    out += m.flush()
    # The stop sequence completed first wins; the same however the text was cut.
    found = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    expected = text[: min(found)[1]] if found else text
    assert out == expected
    assert stopped == bool(found)


# -- SSE ---------------------------------------------------------------------------------
def test_sse_decoder() -> None:
    d = SSEDecoder()
    lines = [": keep-alive", "event: chunk", "data: {\"a\": 1}", "", "data: x", "data: y", "",
             "data:[DONE]"]
    out = [event for line in lines for event in d.feed_line(line)]
    assert out == ['{"a": 1}', "x\ny"]
    assert d.close() == ["[DONE]"]
    with pytest.raises(MalformedBackendResponse):
        d.feed_line("data: " + "x" * (1024 * 1024 + 1))


# -- cache --------------------------------------------------------------------------------
def test_cache_key_and_ttl() -> None:
    msgs = (Message("user", "hi"),)
    p = GenerationParams(temperature=0)
    assert cache_key("m", msgs, p) == cache_key("m", msgs, GenerationParams(temperature=0))
    assert cache_key("m", msgs, p) != cache_key("n", msgs, p)
    assert cache_key("m", msgs, p) != cache_key("m", (Message("system", "hi"),), p)
    assert cache_key("m", msgs, p) != cache_key("m", msgs, GenerationParams(temperature=0,
                                                                            max_tokens=3))
    now = [0.0]
    cache = ResponseCache(maxsize=2, ttl=10, timer=lambda: now[0])
    answer = CachedAnswer("a", 1, 1, "stop")
    assert cache.get("k") is None
    cache.put("k", answer)
    assert cache.get("k") == answer
    now[0] = 11.0
    assert cache.get("k") is None
    cache.put("a", answer)
    cache.put("b", answer)
    assert cache.get("a") == answer  # "a" is now the most recently used
    cache.put("c", answer)
    assert cache.get("b") is None and cache.get("a") == answer
    assert cache.statistics() == {"size": 2, "maxsize": 2, "ttl": 10, "hits": 3, "misses": 3}


# -- configuration ------------------------------------------------------------------------
def _config(tables: dict[str, Any], env: dict[str, str] | None = None) -> NodeConfig:
    return NodeConfig.from_mapping({"node": {"home": "/tmp/x"}, **tables}, env=env or {})


def test_default_models_is_the_embedded_smollm2() -> None:
    cfg = _config({})
    settings = InferenceSettings.from_config(cfg)
    entries = build_models(cfg.tree, settings)
    assert [(e.backend.name, e.backend.kind, e.aliases, e.default) for e in entries] == [
        ("smollm2", "llamacpp", ("smollm2-135m", "default"), True),
        ("all-minilm", "onnx", ("all-minilm-l6-v2",), False)]
    assert not build_models(cfg.tree, InferenceSettings(embedded=False))


def test_env_and_models_tables(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    cfg = _config(
        {"inference": {"max_queue": 3},
         "models": [
             {"name": "local", "path": str(gguf), "slots": 1, "aliases": ["l"]},
             {"name": "gpt", "backend": "openai", "remote_model": "gpt-4o-mini"},
             {"name": "llama3", "backend": "ollama", "default": True, "max_queue": 0},
             {"name": "fake", "backend": "synthetic", "tokens": 5, "token_delay": 0.01},
         ]},
        env={"OLLAMA_URL": "http://10.0.0.9:11434", "OPENAI_API_KEY": "sk-test",
             "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"},
    )
    entries = build_models(cfg.tree, InferenceSettings.from_config(cfg))
    by_name = {e.backend.name: e for e in entries}
    assert set(by_name) == {"local", "gpt", "llama3", "fake"}
    local = by_name["local"].backend
    assert local.kind == "llamacpp" and local.slots == 1 and by_name["local"].max_queue == 3
    gpt: Any = by_name["gpt"].backend
    assert gpt.base_url == "http://127.0.0.1:9/v1" and gpt.remote_model == "gpt-4o-mini"
    assert gpt._headers == {"Authorization": "Bearer sk-test"}
    llama3: Any = by_name["llama3"].backend
    assert llama3.base_url == "http://10.0.0.9:11434" and by_name["llama3"].default
    assert by_name["llama3"].max_queue == 0
    fake: Any = by_name["fake"].backend
    assert (fake.tokens, fake.token_delay) == (5, 0.01)


@pytest.mark.parametrize(
    "tables, message",
    [
        ({"inference": {"slots": 0}}, "inference.slots: must be >= 1"),
        ({"inference": {"slotz": 2}}, "inference.slotz: unknown key"),
        ({"inference": {"ollama_url": "ftp://x"}}, "inference.ollama_url: must be an http"),
        ({"inference": {"default_model": "nope"}}, "inference.default_model: no model"),
        ({"models": [{"backend": "ollama"}]}, "models[0].name: is required"),
        ({"models": [{"name": "a", "backend": "tgi"}]}, "models[0].backend: must be one of"),
        ({"models": [{"name": "a", "path": "/no/such.gguf"}]}, "models[0].path: no such"),
        ({"models": [{"name": "a", "backend": "ollama", "path": "x"}]},
         "models[0].path: unknown key"),
        ({"models": [{"name": "a", "backend": "synthetic"},
                     {"name": "b", "backend": "synthetic", "aliases": ["a"]}]},
         "models[1].aliases[0]: model name 'a' is used twice"),
        ({"models": [{"name": "a", "backend": "synthetic", "slots": 0}]},
         "models[0].slots: must be >= 1"),
        ({"models": [{"name": "a b", "backend": "synthetic"}]}, "models[0].name: must be"),
        ({"models": [{"name": "a", "backend": "openai", "url": "nope"}]}, "models[0].url"),
        ({"models": [{"name": "a", "backend": "synthetic", "default": True},
                     {"name": "b", "backend": "synthetic", "default": True}]},
         "more than one model has default"),
    ],
)
def test_config_errors_name_the_key(tables: dict[str, Any], message: str) -> None:
    cfg = _config(tables)
    with pytest.raises(ConfigError) as ei:
        build_models(cfg.tree, InferenceSettings.from_config(cfg))
    assert message in ei.value.message


@pytest.mark.parametrize("params", [
    {"prompt": "hi"}, "hi", {"prompt": "hi", "model": "llama3:8b"},
    {"messages": [{"role": "user", "content": "hi"}], "modelConfig": {"model": "org/m"}},
    {"prompt": "hi", "model": None},
])
def test_the_requested_model_is_what_the_full_parse_finds(params: Any) -> None:
    assert requested_model(params) == parse_prompt_params(params).model


@pytest.mark.parametrize("params, field", [
    ({"prompt": "hi", "model": 5}, "model"),
    ({"prompt": "hi", "model": "bad name!"}, "model"),
    ({"prompt": "hi", "model": "a", "modelConfig": {"model": "b"}}, "modelConfig.model"),
    (["not", "a", "map"], "params"),
])
def test_a_bad_model_is_refused_as_the_full_parse_refuses_it(params: Any, field: str) -> None:
    for parse in (requested_model, parse_prompt_params):
        with pytest.raises(InvalidParams) as info:
            parse(params)
        assert info.value.data["field"] == field
