"""The gateway's configuration: the ``[gateway]`` table.

    [gateway]
    default_rate_limit = 100       # requests per hour, default tier   (env DEFAULT_RATE_LIMIT)
    premium_rate_limit = 1000      # requests per hour, premium tier   (env PREMIUM_RATE_LIMIT)
    key_rate_limit = 0             # requests per hour per API key; 0 = only the user's limit
    default_token_limit = 0        # tokens per hour, default tier; 0 = no token limit
    premium_token_limit = 0        # tokens per hour, premium tier; 0 = no token limit
    concurrent_per_key = 8         # requests in flight per API key; 0 = unlimited
    concurrent_per_user = 16       # requests in flight per user, all keys; 0 = unlimited
    default_model = "default"      # for requests that name no model
    default_embedding_model = "all-minilm"   # for embedding requests that name none
    request_timeout = 300          # seconds from arrival to the last token
    max_attempts = 3               # workers tried before the first token
    cooldown = 10                  # seconds a failing worker is skipped
    candidate_ttl = 2              # seconds a model's worker list is reused
    usage_flush_interval = 1.0     # seconds between usage/log batches to the ledger
    coordinator_timeout = 2.0      # seconds to wait for the quota coordinator

Every value is validated when the role is built; a bad one raises
:class:`~p2pinfer.errors.ConfigError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import NodeConfig
from .quota import Limits

__all__ = ["GatewaySettings"]

_KEYS = {
    "default_rate_limit", "premium_rate_limit", "key_rate_limit", "default_token_limit",
    "premium_token_limit", "concurrent_per_key", "concurrent_per_user", "default_model",
    "default_embedding_model",
    "request_timeout", "max_attempts", "cooldown", "candidate_ttl", "usage_flush_interval",
    "coordinator_timeout",
}


@dataclass(frozen=True)
class GatewaySettings:
    default_rate_limit: int = 100
    premium_rate_limit: int = 1000
    key_rate_limit: int | None = None
    default_token_limit: int | None = None
    premium_token_limit: int | None = None
    concurrent_per_key: int | None = 8
    concurrent_per_user: int | None = 16
    default_model: str = "default"
    default_embedding_model: str = "all-minilm"
    request_timeout: float = 300.0
    max_attempts: int = 3
    cooldown: float = 10.0
    candidate_ttl: float = 2.0
    usage_flush_interval: float = 1.0
    coordinator_timeout: float = 2.0

    @classmethod
    def from_config(cls, config: NodeConfig) -> GatewaySettings:
        sec = config.section("gateway")
        sec.reject_unknown(_KEYS)

        def zero_is_none(key: str, default: int) -> int | None:
            value = sec.get_int(key, default, minimum=0, maximum=10**12)
            return value or None

        return cls(
            default_rate_limit=sec.get_int("default_rate_limit", 100, minimum=1,
                                           maximum=10**9),
            premium_rate_limit=sec.get_int("premium_rate_limit", 1000, minimum=1,
                                           maximum=10**9),
            key_rate_limit=zero_is_none("key_rate_limit", 0),
            default_token_limit=zero_is_none("default_token_limit", 0),
            premium_token_limit=zero_is_none("premium_token_limit", 0),
            concurrent_per_key=zero_is_none("concurrent_per_key", 8),
            concurrent_per_user=zero_is_none("concurrent_per_user", 16),
            default_model=sec.get_str("default_model", "default"),
            default_embedding_model=sec.get_str("default_embedding_model", "all-minilm"),
            request_timeout=sec.get_float("request_timeout", 300.0, minimum=1, maximum=86400),
            max_attempts=sec.get_int("max_attempts", 3, minimum=1, maximum=20),
            cooldown=sec.get_float("cooldown", 10.0, minimum=0, maximum=3600),
            candidate_ttl=sec.get_float("candidate_ttl", 2.0, minimum=0.1, maximum=600),
            usage_flush_interval=sec.get_float("usage_flush_interval", 1.0, minimum=0.05,
                                               maximum=60),
            coordinator_timeout=sec.get_float("coordinator_timeout", 2.0, minimum=0.1,
                                              maximum=60),
        )

    def limits_for(self, tier: str) -> Limits:
        """The limits of a user of ``tier`` (``default`` or ``premium``)."""
        premium = tier == "premium"
        return Limits(
            requests_per_window=self.premium_rate_limit if premium else self.default_rate_limit,
            key_requests_per_window=self.key_rate_limit,
            tokens_per_window=self.premium_token_limit if premium else self.default_token_limit,
            concurrent_per_key=self.concurrent_per_key,
            concurrent_per_user=self.concurrent_per_user,
        )
