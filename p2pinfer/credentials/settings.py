"""``[auth]`` configuration: token lifetimes, argon2 cost, throttling.

    [auth]
    token_ttl = 3600.0              # access token lifetime, seconds
    refresh_ttl = 1209600.0         # refresh token lifetime (14 days), renewed on refresh
    session_max = 2592000.0         # absolute session lifetime (30 days) from the login
    clock_skew = 30.0               # leeway on exp/iat between nodes' clocks, seconds
    argon2_time_cost = 2            # argon2id passes           (OWASP: m=19 MiB, t=2, p=1)
    argon2_memory_kib = 19456       # argon2id memory, KiB
    argon2_parallelism = 1          # argon2id lanes
    max_concurrent_hashes = 2       # argon2 runs at once on this node (threads)
    password_min_length = 10
    max_failures_per_account = 5    # failed logins of one account (swarm-wide) ...
    max_failures_per_source = 20    # ... or from one source (this node; also invalid API keys) ...
    throttle_window = 900.0         # ... within this many seconds, then LoginThrottled
    registrations_per_source = 10   # registrations from one source ...
    registration_window = 3600.0    # ... per this many seconds, then RateLimited
    registration_wait = 1.0         # seconds registerUser watches for a rival registration
    max_keys_per_user = 50          # active API keys one user may hold
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import NodeConfig, Section

__all__ = ["AuthSettings"]


@dataclass(frozen=True)
class AuthSettings:
    """Validated ``[auth]`` settings (see the module docstring for each key)."""

    token_ttl: float = 3600.0
    refresh_ttl: float = 14 * 86400.0
    session_max: float = 30 * 86400.0
    clock_skew: float = 30.0
    argon2_time_cost: int = 2
    argon2_memory_kib: int = 19456
    argon2_parallelism: int = 1
    max_concurrent_hashes: int = 2
    password_min_length: int = 10
    max_failures_per_account: int = 5
    max_failures_per_source: int = 20
    throttle_window: float = 900.0
    registrations_per_source: int = 10
    registration_window: float = 3600.0
    registration_wait: float = 1.0
    max_keys_per_user: int = 50

    @classmethod
    def from_section(cls, s: Section) -> AuthSettings:
        """Read and check the ``[auth]`` table.

        Raises:
            ConfigError: naming ``auth.<key>`` and what is wrong with it.
        """
        d = cls()
        values: dict[str, Any] = {
            "token_ttl": s.get_float("token_ttl", d.token_ttl, minimum=1.0, maximum=86400.0),
            "refresh_ttl": s.get_float("refresh_ttl", d.refresh_ttl, minimum=1.0,
                                       maximum=365 * 86400.0),
            "session_max": s.get_float("session_max", d.session_max, minimum=1.0,
                                       maximum=365 * 86400.0),
            "clock_skew": s.get_float("clock_skew", d.clock_skew, minimum=0.0, maximum=600.0),
            "argon2_time_cost": s.get_int("argon2_time_cost", d.argon2_time_cost, minimum=1,
                                          maximum=20),
            # 8 KiB per lane is argon2's own floor; 1 GiB bounds one login's memory.
            "argon2_memory_kib": s.get_int("argon2_memory_kib", d.argon2_memory_kib,
                                           minimum=64, maximum=1024 * 1024),
            "argon2_parallelism": s.get_int("argon2_parallelism", d.argon2_parallelism,
                                            minimum=1, maximum=16),
            "max_concurrent_hashes": s.get_int("max_concurrent_hashes", d.max_concurrent_hashes,
                                               minimum=1, maximum=64),
            "password_min_length": s.get_int("password_min_length", d.password_min_length,
                                             minimum=8, maximum=128),
            "max_failures_per_account": s.get_int("max_failures_per_account",
                                                  d.max_failures_per_account, minimum=1,
                                                  maximum=1000),
            "max_failures_per_source": s.get_int("max_failures_per_source",
                                                 d.max_failures_per_source, minimum=1,
                                                 maximum=100_000),
            "throttle_window": s.get_float("throttle_window", d.throttle_window, minimum=0.1,
                                           maximum=7 * 86400.0),
            "registrations_per_source": s.get_int("registrations_per_source",
                                                  d.registrations_per_source, minimum=1,
                                                  maximum=100_000),
            "registration_window": s.get_float("registration_window", d.registration_window,
                                               minimum=0.1, maximum=7 * 86400.0),
            "registration_wait": s.get_float("registration_wait", d.registration_wait,
                                             minimum=0.0, maximum=60.0),
            "max_keys_per_user": s.get_int("max_keys_per_user", d.max_keys_per_user, minimum=1,
                                           maximum=10_000),
        }
        s.reject_unknown(set(values))  # a typo is an error, as in every table
        return cls(**values)

    @classmethod
    def from_config(cls, config: NodeConfig) -> AuthSettings:
        return cls.from_section(config.section("auth"))
