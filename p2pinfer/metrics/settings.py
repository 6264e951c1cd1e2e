"""``[metrics]`` configuration (env: ``METRICS_ENABLED``, ``PROMETHEUS_PORT``).

    [metrics]
    enabled = true              # METRICS_ENABLED: the swarm exporter and alerting
    prometheus_port = 9090      # PROMETHEUS_PORT: 0 picks a free port
    host = "127.0.0.1"          # where the exporter listens
    interval = 15.0             # seconds between collections / alert evaluations
    peer_timeout = 2.0          # per-peer collection timeout; slower peers count as down
    discover_interval = 30.0    # seconds between DHT lookups for member nodes
    forget_after = 3600.0       # a peer down this long leaves the swarm view
    window = 300.0              # the rate window of the alert rules
    alert_for = -1              # if >= 0: override every rule's "for" duration
    error_rate = 0.05           # HighErrorRate: failed / all requests over the window
    min_requests = 20           # ... and at least this many requests in the window
    latency_p95 = 5.0           # HighLatencyP95: seconds
    replication_lag = 60.0      # ReplicationLag: seconds
    rate_limit_storm = 1.0      # RateLimitStorm: violations per second over the window
    expected_models = []        # models that must always have a worker
    webhook_url = ""            # POSTed on every alert that fires or resolves
    webhook_timeout = 5.0
    max_violation_pairs = 1000  # cardinality cap of the rate-limit violation counter
    label_user_ids = false      # put user and API key ids in metric labels (else "hidden")
    max_models = 100            # distinct model label values per metric
    max_recorded_series = 200   # distinct label sets per metric via recordMetric
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import NodeConfig
from ..errors import ConfigError

__all__ = ["MetricsSettings"]


@dataclass(frozen=True)
class MetricsSettings:
    """Validated ``[metrics]`` settings (see the module docstring)."""

    enabled: bool = True
    prometheus_port: int = 9090
    host: str = "127.0.0.1"
    interval: float = 15.0
    peer_timeout: float = 2.0
    discover_interval: float = 30.0
    forget_after: float = 3600.0
    window: float = 300.0
    alert_for: float | None = None
    error_rate: float = 0.05
    min_requests: int = 20
    latency_p95: float = 5.0
    replication_lag: float = 60.0
    rate_limit_storm: float = 1.0
    expected_models: tuple[str, ...] = ()
    webhook_url: str | None = None
    webhook_timeout: float = 5.0
    max_violation_pairs: int = 1000
    label_user_ids: bool = False
    max_models: int = 100
    max_recorded_series: int = 200

    @classmethod
    def from_config(cls, config: NodeConfig) -> MetricsSettings:
        """Read ``[metrics]``.

        Raises:
            ConfigError: a bad value, naming ``metrics.<key>``.
        """
        s = config.section("metrics")
        s.reject_unknown(set(cls.__dataclass_fields__))
        alert_for = s.get_float("alert_for", -1.0, minimum=-1.0, maximum=86400.0)
        webhook = s.get_optional_str("webhook_url")
        if webhook is not None and not webhook.startswith(("http://", "https://")):
            raise ConfigError(f"metrics.webhook_url: must be an http(s) URL, got {webhook!r}")
        return cls(
            enabled=s.get_bool("enabled", True),
            prometheus_port=s.get_int("prometheus_port", 9090, minimum=0, maximum=65535),
            host=s.get_str("host", "127.0.0.1"),
            interval=s.get_float("interval", 15.0, minimum=0.05, maximum=3600.0),
            peer_timeout=s.get_float("peer_timeout", 2.0, minimum=0.05, maximum=60.0),
            discover_interval=s.get_float("discover_interval", 30.0, minimum=0.1,
                                          maximum=86400.0),
            forget_after=s.get_float("forget_after", 3600.0, minimum=1.0, maximum=30 * 86400.0),
            window=s.get_float("window", 300.0, minimum=0.1, maximum=86400.0),
            alert_for=None if alert_for < 0 else alert_for,
            error_rate=s.get_float("error_rate", 0.05, minimum=0.0, maximum=1.0),
            min_requests=s.get_int("min_requests", 20, minimum=1),
            latency_p95=s.get_float("latency_p95", 5.0, minimum=0.0),
            replication_lag=s.get_float("replication_lag", 60.0, minimum=0.0),
            rate_limit_storm=s.get_float("rate_limit_storm", 1.0, minimum=0.0),
            expected_models=tuple(s.get_str_list("expected_models")),
            webhook_url=webhook,
            webhook_timeout=s.get_float("webhook_timeout", 5.0, minimum=0.1, maximum=120.0),
            max_violation_pairs=s.get_int("max_violation_pairs", 1000, minimum=1,
                                          maximum=1_000_000),
            label_user_ids=s.get_bool("label_user_ids", False),
            max_models=s.get_int("max_models", 100, minimum=1, maximum=100_000),
            max_recorded_series=s.get_int("max_recorded_series", 200, minimum=1,
                                          maximum=100_000),
        )
