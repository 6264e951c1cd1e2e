"""Prometheus metrics of the inference role, on the node's own registry.

Every name starts with ``ai_platform_inference_``. The ``model`` label only
ever holds names of models configured on this node (a request for an unknown
model is counted under ``model="_unknown"``), so label cardinality is bounded
by the configuration. The platform-wide
``ai_platform_request_duration_seconds{service,model}`` belongs to the
metrics role; this module keeps to its own names so both can share a
registry.

    ai_platform_inference_queue_depth{model}             gauge   requests waiting for a slot
    ai_platform_inference_in_flight{model}               gauge   slots in use
    ai_platform_inference_free_slots{model}              gauge
    ai_platform_inference_slots{model}                   gauge   slots configured now (autoscale)
    ai_platform_inference_requests_total{model,status}   counter by outcome (see below)
    ai_platform_inference_tokens_generated_total{model}  counter completion tokens (backend counts)
    ai_platform_inference_prompt_tokens_total{model}     counter
    ai_platform_inference_cache_hits_total{model}        counter
    ai_platform_inference_cache_misses_total{model}      counter
    ai_platform_inference_duration_seconds{model}        histogram  whole request
    ai_platform_inference_ttft_seconds{model}            histogram  time to first token

``status`` is one of success, error, cancelled, overloaded, cached.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["InferenceMetrics", "PREFIX"]

PREFIX = "ai_platform_inference_"
UNKNOWN_MODEL = "_unknown"

_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)


class InferenceMetrics:
    """The inference collectors, registered on ``registry`` (never the global one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.queue_depth = Gauge(PREFIX + "queue_depth", "Requests waiting for a slot",
                                 ["model"], registry=registry)
        self.in_flight = Gauge(PREFIX + "in_flight", "Slots in use", ["model"],
                               registry=registry)
        self.free_slots = Gauge(PREFIX + "free_slots", "Slots free", ["model"],
                                registry=registry)
        self.slots = Gauge(PREFIX + "slots", "Generation slots (may change with autoscale)",
                           ["model"], registry=registry)
        self.requests = Counter(PREFIX + "requests", "Prompt requests by outcome",
                                ["model", "status"], registry=registry)
        self.tokens_generated = Counter(PREFIX + "tokens_generated",
                                        "Completion tokens generated (as the backend counts)",
                                        ["model"], registry=registry)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed",
                                     ["model"], registry=registry)
        self.cache_hits = Counter(PREFIX + "cache_hits", "Response cache hits", ["model"],
                                  registry=registry)
        self.cache_misses = Counter(PREFIX + "cache_misses", "Response cache misses",
                                    ["model"], registry=registry)
        self.duration = Histogram(PREFIX + "duration_seconds", "Prompt request duration",
                                  ["model"], buckets=_DURATION_BUCKETS, registry=registry)
        self.ttft = Histogram(PREFIX + "ttft_seconds", "Time to first token", ["model"],
                              buckets=_TTFT_BUCKETS, registry=registry)

    def watch_model(self, model: str, *, queue_depth: Callable[[], float],
                    in_flight: Callable[[], float], free_slots: Callable[[], float],
                    slots: Callable[[], float] | None = None) -> None:
        """Gauges of ``model`` read at scrape time from the engine's own counters."""
        self.queue_depth.labels(model).set_function(queue_depth)
        self.in_flight.labels(model).set_function(in_flight)
        self.free_slots.labels(model).set_function(free_slots)
        if slots is not None:
            self.slots.labels(model).set_function(slots)
        for status in ("success", "error", "cancelled", "overloaded", "cached"):
            self.requests.labels(model, status)
        for counter in (self.tokens_generated, self.prompt_tokens, self.cache_hits,
                        self.cache_misses):
            counter.labels(model)
