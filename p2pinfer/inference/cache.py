"""The response cache: answers to deterministic requests, LRU with a TTL.

Only a request that gives the same answer every time may be served from the
cache: temperature 0 (greedy) or a fixed seed. The key is a SHA-256 over the
canonical JSON of (model, messages, parameters); the value keeps the answer's
text and the token counts the backend reported. A hit is sent as one chunk:
the answer exists already, so there is nothing to stream token by token.
Errors and cancelled generations are never stored (the engine only calls
:meth:`ResponseCache.put` for finished answers). Entries expire ``ttl``
seconds after they were stored, and the least recently used go first when
the cache is full.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cachetools import TTLCache

from .backend import GenerationParams, Message

__all__ = ["CachedAnswer", "ResponseCache", "cache_key"]


@dataclass(frozen=True)
class CachedAnswer:
    """A finished answer."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    usage_exact: bool = True


def cache_key(model: str, messages: tuple[Message, ...], params: GenerationParams) -> str:
    """A stable hash of everything that decides a deterministic answer."""
    canonical = json.dumps(
        {
            "model": model,
            "messages": [m.to_wire() for m in messages],
            "params": params.to_dict(),
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """An LRU cache with a TTL, counting hits and misses.

    Args:
        maxsize: answers kept at most.
        ttl: seconds an answer stays valid.
        timer: the clock (monotonic seconds); tests pass a fake one.
    """

    def __init__(self, maxsize: int = 256, ttl: float = 600.0,
                 *, timer: Callable[[], float] = time.monotonic) -> None:
        self.maxsize = maxsize
        self.ttl = ttl
        self._entries: TTLCache[str, CachedAnswer] = TTLCache(maxsize=maxsize, ttl=ttl,
                                                              timer=timer)
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> CachedAnswer | None:
        """The answer stored under ``key``, counting a hit or a miss."""
        answer = self._entries.get(key)
        if answer is None:
            self.misses += 1
        else:
            self.hits += 1
        return answer

    def put(self, key: str, answer: CachedAnswer) -> None:
        self._entries[key] = answer

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        self._entries.expire()
        return len(self._entries)

    def statistics(self) -> dict[str, Any]:
        """Size, capacity, TTL, hits and misses."""
        return {
            "size": len(self),
            "maxsize": self.maxsize,
            "ttl": self.ttl,
            "hits": self.hits,
            "misses": self.misses,
        }
