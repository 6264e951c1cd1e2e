"""The inference role's configuration: ``[inference]`` and ``[[models]]``.

Every value is checked when the role is built; a bad one raises
:class:`~p2pinfer.errors.ConfigError` naming it (``models[1].slots: must be
>= 1, got 0``). Unknown keys are errors too.

    [inference]
    default_model = "smollm2"     # answers requests that name no model (default: the first)
    embedded = true               # with no [[models]]: serve the embedded SmolLM2 and
                                  # the all-minilm embedding model
    slots = 2                     # parallel sequences per local model (default min(cpus, 4))
    n_threads = 2                 # CPU threads of each llama.cpp runner (default: the CPUs, max 8)
    n_ctx = 2048                  # context of each slot, in tokens
    repack = "auto"               # llama.cpp weight repacking: auto | on | off (off: the
                                  # portable fallback; auto: off on AMX CPUs and after a crash)
    llama_server = "/usr/local/bin/llama-server"   # default: next to Python, then PATH
    max_queue = 32                # requests waiting per model before "overloaded"
    cache = true                  # response cache for deterministic requests
    cache_size = 256
    cache_ttl = 600               # seconds
    max_tokens_limit = 4096       # largest max_tokens a request may ask
    default_max_tokens = 256
    default_temperature = 0.7
    max_messages = 64
    max_prompt_chars = 32000
    timeout = 60                  # HTTP backends: seconds between two reads
    connect_timeout = 5
    probe_interval = 30           # HTTP backends: seconds between catalog probes
    ollama_url = "http://127.0.0.1:11434"          # env OLLAMA_URL
    openai_base_url = "https://api.openai.com/v1"  # env OPENAI_BASE_URL
    openai_api_key = "sk-..."                      # env OPENAI_API_KEY

    [[models]]
    name = "smollm2"              # required; letters, digits, ._:/@+-
    backend = "llamacpp"          # llamacpp (default) | openai | ollama | onnx | synthetic
    aliases = ["default"]
    slots = 2
    max_queue = 32
    default = true
    # llamacpp: path (a GGUF file; default the embedded SmolLM2), n_ctx, n_threads,
    #           n_threads_batch, repack, gpu_layers (layers offloaded to a GPU)
    # openai:   url, api_key, remote_model, timeout, connect_timeout, context_length
    # ollama:   url, remote_model, timeout, connect_timeout
    #           (openai and ollama: at most ``slots`` connections to the server,
    #           each closed after 5 s unused)
    # onnx (embeddings only): path (model.onnx; default the embedded all-MiniLM-L6-v2),
    #           tokenizer (its tokenizer.json), max_length (tokens read, 256), n_threads
    # synthetic (load tests only): tokens, token_delay, first_token_delay, context_length
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2

from ..config import NodeConfig, Section
from ..errors import ConfigError
from ..prompts import MODEL_NAME, ParamLimits
from .backend import Backend
from .embedding import (
    EMBEDDING_NAME,
    OnnxEmbeddingBackend,
    OnnxOptions,
    embedded_embedding_paths,
)
from .llamacpp import REPACK_MODES, LlamaCppBackend, LlamaCppOptions, embedded_model_path
from .ollama import DEFAULT_OLLAMA_URL, OllamaBackend
from .openai import DEFAULT_OPENAI_URL, OpenAIBackend
from .runner import find_llama_server
from .synthetic import SyntheticBackend

__all__ = ["EMBEDDED_ALIASES", "EMBEDDED_NAME", "InferenceSettings", "ModelEntry", "build_models"]

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2"
EMBEDDED_ALIASES = ("smollm2-135m", "default")
EMBEDDING_ALIASES = ("all-minilm-l6-v2",)
BACKENDS = ("llamacpp", "openai", "ollama", "onnx", "synthetic")

_INFERENCE_KEYS = {
    "default_model", "embedded", "slots", "n_threads", "n_ctx", "max_queue", "cache",
    "cache_size", "cache_ttl", "max_tokens_limit", "default_max_tokens",
    "default_temperature", "max_messages", "max_prompt_chars", "timeout", "connect_timeout",
    "probe_interval", "ollama_url", "openai_base_url", "openai_api_key", "repack",
    "llama_server",
}
_COMMON_KEYS = {"name", "backend", "aliases", "slots", "max_queue", "default"}
_BACKEND_KEYS = {
    "llamacpp": {"path", "n_ctx", "n_threads", "n_threads_batch", "repack", "gpu_layers"},
    "openai": {"url", "api_key", "remote_model", "timeout", "connect_timeout", "context_length"},
    "ollama": {"url", "remote_model", "timeout", "connect_timeout"},
    "onnx": {"path", "tokenizer", "max_length", "n_threads"},
    "synthetic": {"tokens", "token_delay", "first_token_delay", "context_length"},
}


def _where(section: Section, key: str) -> str:
    """``table.key`` as config errors name it."""
    return f"{section.name}.{key}" if section.name else key


def _check_url(section: Section, key: str, value: str) -> str:
    try:
        url = httpx2.URL(value)
    except Exception as exc:
        raise ConfigError(f"{_where(section, key)}: not a URL: {value!r}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"{_where(section, key)}: must be an http(s) URL, got {value!r}")
    return value.rstrip("/")


def _name(section: Section, key: str, value: Any) -> str:
    if not isinstance(value, str) or not MODEL_NAME.match(value):
        raise ConfigError(f"{_where(section, key)}: must be a model name (letters, digits, "
                          f"._:/@+-), got {value!r}")
    return value


@dataclass(frozen=True)
class InferenceSettings:
    """``[inference]``, validated. Build with :meth:`from_section`."""

    default_model: str | None = None
    embedded: bool = True
    slots: int = 2
    n_threads: int | None = None
    n_ctx: int = 2048
    repack: str = "auto"
    llama_server: Path | None = None
    max_queue: int = 32
    cache: bool = True
    cache_size: int = 256
    cache_ttl: float = 600.0
    limits: ParamLimits = ParamLimits()
    timeout: float = 60.0
    connect_timeout: float = 5.0
    probe_interval: float = 30.0
    ollama_url: str = DEFAULT_OLLAMA_URL
    openai_base_url: str = DEFAULT_OPENAI_URL
    openai_api_key: str | None = None

    @classmethod
    def from_section(cls, s: Section) -> InferenceSettings:
        s.reject_unknown(_INFERENCE_KEYS)
        default_model = s.get_optional_str("default_model")
        if default_model is not None:
            _name(s, "default_model", default_model)
        max_tokens = s.get_int("max_tokens_limit", 4096, minimum=1, maximum=1_000_000)
        limits = ParamLimits(
            max_tokens=max_tokens,
            default_max_tokens=s.get_int("default_max_tokens", min(256, max_tokens),
                                         minimum=1, maximum=max_tokens),
            default_temperature=s.get_float("default_temperature", 0.7, minimum=0, maximum=2),
            max_messages=s.get_int("max_messages", 64, minimum=1, maximum=10_000),
            max_prompt_chars=s.get_int("max_prompt_chars", 32_000, minimum=1,
                                       maximum=10_000_000),
        )
        ollama = s.get_optional_str("ollama_url")
        llama_server = s.get_optional_str("llama_server")
        openai = s.get_optional_str("openai_base_url")
        return cls(
            default_model=default_model,
            embedded=s.get_bool("embedded", True),
            slots=s.get_int("slots", max(1, min(os.cpu_count() or 1, 4)), minimum=1,
                            maximum=256),
            n_threads=(s.get_int("n_threads", 1, minimum=1, maximum=256)
                       if "n_threads" in s.data else None),
            n_ctx=s.get_int("n_ctx", 2048, minimum=128, maximum=1 << 20),
            repack=s.get_str("repack", "auto", choices=REPACK_MODES),
            llama_server=(find_llama_server(llama_server) if llama_server else None),
            max_queue=s.get_int("max_queue", 32, minimum=0, maximum=1_000_000),
            cache=s.get_bool("cache", True),
            cache_size=s.get_int("cache_size", 256, minimum=1, maximum=10_000_000),
            cache_ttl=s.get_float("cache_ttl", 600.0, minimum=0.001, maximum=86400 * 365),
            limits=limits,
            timeout=s.get_float("timeout", 60.0, minimum=0.01, maximum=86400),
            connect_timeout=s.get_float("connect_timeout", 5.0, minimum=0.01, maximum=3600),
            probe_interval=s.get_float("probe_interval", 30.0, minimum=0.1, maximum=86400),
            ollama_url=_check_url(s, "ollama_url", ollama) if ollama else DEFAULT_OLLAMA_URL,
            openai_base_url=(_check_url(s, "openai_base_url", openai) if openai
                             else DEFAULT_OPENAI_URL),
            openai_api_key=s.get_optional_str("openai_api_key"),
        )

    @classmethod
    def from_config(cls, config: NodeConfig) -> InferenceSettings:
        return cls.from_section(config.section("inference"))


@dataclass(frozen=True)
class ModelEntry:
    """A backend built from one ``[[models]]`` table, with how to serve it."""

    backend: Backend
    aliases: tuple[str, ...]
    max_queue: int
    default: bool


def _build_one(m: Section, settings: InferenceSettings,
               transport: httpx2.AsyncBaseTransport | None) -> ModelEntry:
    if "name" not in m.data:
        raise ConfigError(f"{_where(m, 'name')}: is required")
    name = _name(m, "name", m.raw("name"))
    kind = m.get_str("backend", "llamacpp", choices=BACKENDS)
    m.reject_unknown(_COMMON_KEYS | _BACKEND_KEYS[kind], f"backend {kind}")
    aliases = tuple(_name(m, f"aliases[{i}]", a) for i, a in
                    enumerate(m.get_str_list("aliases")))
    max_queue = m.get_int("max_queue", settings.max_queue, minimum=0, maximum=1_000_000)
    default = m.get_bool("default", False)
    backend: Backend
    if kind == "llamacpp":
        raw_path = m.get_optional_str("path")
        if raw_path is None:
            path = embedded_model_path()
        else:
            path = Path(raw_path).expanduser()
            if not path.is_file():
                raise ConfigError(f"{_where(m, 'path')}: no such GGUF file: {raw_path!r}")
        n_threads = (m.get_int("n_threads", 1, minimum=1, maximum=256)
                     if "n_threads" in m.data else settings.n_threads)
        backend = LlamaCppBackend(name, LlamaCppOptions(
            path=path,
            slots=m.get_int("slots", settings.slots, minimum=1, maximum=256),
            n_ctx=m.get_int("n_ctx", settings.n_ctx, minimum=128, maximum=1 << 20),
            n_threads=n_threads,
            n_threads_batch=(m.get_int("n_threads_batch", 1, minimum=1, maximum=256)
                             if "n_threads_batch" in m.data else None),
            repack=m.get_str("repack", settings.repack, choices=REPACK_MODES),
            gpu_layers=(m.get_int("gpu_layers", 0, minimum=-1, maximum=100_000)
                        if "gpu_layers" in m.data else None),
            llama_server=settings.llama_server,
            timeout=settings.timeout,
        ))
    elif kind in ("openai", "ollama"):
        url = m.get_optional_str("url")
        common: dict[str, Any] = {
            "remote_model": _name(m, "remote_model", m.raw("remote_model", name)),
            "slots": m.get_int("slots", 4, minimum=1, maximum=4096),
            "timeout": m.get_float("timeout", settings.timeout, minimum=0.01, maximum=86400),
            "connect_timeout": m.get_float("connect_timeout", settings.connect_timeout,
                                           minimum=0.01, maximum=3600),
            "probe_interval": settings.probe_interval,
            "transport": transport,
        }
        if kind == "openai":
            backend = OpenAIBackend(
                name,
                base_url=_check_url(m, "url", url) if url else settings.openai_base_url,
                api_key=m.get_optional_str("api_key") or settings.openai_api_key,
                **common,
            )
            if "context_length" in m.data:
                backend.context_length = m.get_int("context_length", 0, minimum=1)
        else:
            backend = OllamaBackend(
                name, base_url=_check_url(m, "url", url) if url else settings.ollama_url,
                **common)
    elif kind == "onnx":
        paths = {}
        for key in ("path", "tokenizer"):
            raw = m.get_optional_str(key)
            if raw is not None:
                paths[key] = Path(raw).expanduser()
                if not paths[key].is_file():
                    raise ConfigError(f"{_where(m, key)}: no such file: {raw!r}")
        if len(paths) == 1:
            raise ConfigError(f"{_where(m, 'tokenizer')}: give both path and tokenizer "
                              "(or neither, for the embedded all-MiniLM-L6-v2)")
        model_path, tokenizer = ((paths["path"], paths["tokenizer"]) if paths
                                 else embedded_embedding_paths())
        backend = OnnxEmbeddingBackend(name, OnnxOptions(
            path=model_path, tokenizer=tokenizer,
            slots=m.get_int("slots", 2, minimum=1, maximum=256),
            max_length=m.get_int("max_length", 256, minimum=8, maximum=8192),
            n_threads=m.get_int("n_threads", 1, minimum=1, maximum=256)))
    else:
        backend = SyntheticBackend(
            name,
            tokens=m.get_int("tokens", 16, minimum=0, maximum=1_000_000),
            token_delay=m.get_float("token_delay", 0.0, minimum=0, maximum=60),
            first_token_delay=m.get_float("first_token_delay", 0.0, minimum=0, maximum=600),
            slots=m.get_int("slots", 1024, minimum=1, maximum=1_000_000),
            context_length=m.get_int("context_length", 8192, minimum=1),
        )
    return ModelEntry(backend, aliases, max_queue, default)


def build_models(
    tree: Mapping[str, Any],
    settings: InferenceSettings,
    *,
    transport: httpx2.AsyncBaseTransport | None = None,
) -> list[ModelEntry]:
    """The models a node serves: every ``[[models]]`` table, or the embedded
    SmolLM2 (``smollm2``, aliases ``smollm2-135m`` and ``default``) and the
    embedding model ``all-minilm`` (when its packages are installed) when
    there is none and ``[inference] embedded`` is on.

    Args:
        tree: the whole config tree (``NodeConfig.tree``).
        settings: ``[inference]``.
        transport: an httpx2 transport for every HTTP backend (tests).
    """
    tables = Section("", tree).get_table_list("models")
    entries: list[ModelEntry] = []
    if not tables:
        if not settings.embedded:
            return []
        backend = LlamaCppBackend(EMBEDDED_NAME, LlamaCppOptions(
            path=embedded_model_path(), slots=settings.slots, n_ctx=settings.n_ctx,
            n_threads=settings.n_threads, repack=settings.repack,
            llama_server=settings.llama_server, timeout=settings.timeout))
        entries.append(ModelEntry(backend, EMBEDDED_ALIASES, settings.max_queue, True))
        try:
            model_path, tokenizer = embedded_embedding_paths()
        except ConfigError as exc:  # a pip-installed SDK without the data packages
            log.info("no embedding model: %s", exc)
        else:
            entries.append(ModelEntry(
                OnnxEmbeddingBackend(EMBEDDING_NAME, OnnxOptions(model_path, tokenizer)),
                EMBEDDING_ALIASES, settings.max_queue, False))
    seen: set[str] = set()
    for table in tables:
        entry = _build_one(table, settings, transport)
        for i, name in enumerate((entry.backend.name, *entry.aliases)):
            if name in seen:
                key = "name" if i == 0 else f"aliases[{i - 1}]"
                raise ConfigError(f"{_where(table, key)}: model name {name!r} is used twice")
            seen.add(name)
        entries.append(entry)
    if sum(e.default for e in entries) > 1:
        raise ConfigError("models: more than one model has default = true")
    names = {n for e in entries for n in (e.backend.name, *e.aliases)}
    if settings.default_model is not None and settings.default_model not in names:
        raise ConfigError(f"inference.default_model: no model or alias "
                          f"{settings.default_model!r} is configured")
    return entries
