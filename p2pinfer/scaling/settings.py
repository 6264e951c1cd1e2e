"""``[scaling]`` configuration: trigger thresholds, the window, the hook and
slot autoscaling bounds.

    [scaling]
    enabled = true              # evaluate the triggers on this node
    interval = 5.0              # seconds between two samples / evaluations
    window = 60.0               # figures are averaged over this many seconds
    cpu_percent = 80.0          # trigger "cpu": host CPU use above this (percent)
    queue_depth = 100.0         # trigger "queue_depth": requests waiting for a slot
    response_time = 5.0         # trigger "response_time": mean seconds per request
    hysteresis = 0.1            # a fired trigger clears below threshold * (1 - hysteresis)
    swarm = true                # on a metrics node: the same triggers over the whole swarm
    hook_command = []           # argv run on every fire / clear; JSON on stdin, P2PINFER_SCALING_*
    hook_url = ""               # or/and: a URL the same JSON is POSTed to
    hook_timeout = 10.0         # seconds per hook run or POST
    hook_attempts = 3           # tries per notification
    autoscale = false           # a worker grows / shrinks its own slots
    min_slots = 1
    max_slots = 8
    grow_queue_depth = 1.0      # grow when the mean queue over the window is above this
    shrink_utilization = 0.5    # shrink when nothing waits and busy slots / slots is below this
    cooldown = 30.0             # seconds between two slot changes of one model

    [scaling.models.smollm2]    # per-model bounds (optional)
    min_slots = 1
    max_slots = 4

Environment: ``P2PINFER_SCALING_HOOK_URL`` and ``P2PINFER_SCALING_HOOK_COMMAND``
(a command line, split like a shell would, without running one) override
the hook. Every value is checked when the node is built; a bad one raises
:class:`~p2pinfer.errors.ConfigError` naming it.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..config import NodeConfig, Section
from ..errors import ConfigError

__all__ = ["ScalingSettings", "SlotBounds", "TRIGGERS"]

# The auto-scaling triggers, by name.
TRIGGERS = ("cpu", "queue_depth", "response_time")

_KEYS = frozenset({
    "enabled", "interval", "window", "cpu_percent", "queue_depth", "response_time",
    "hysteresis", "swarm", "hook_command", "hook_url", "hook_timeout", "hook_attempts",
    "autoscale", "min_slots", "max_slots", "grow_queue_depth", "shrink_utilization",
    "cooldown", "models",
})
_MODEL_KEYS = frozenset({"min_slots", "max_slots"})
ENV_HOOK_URL = "P2PINFER_SCALING_HOOK_URL"
ENV_HOOK_COMMAND = "P2PINFER_SCALING_HOOK_COMMAND"


@dataclass(frozen=True)
class SlotBounds:
    """The slots autoscaling may give one model."""

    min_slots: int
    max_slots: int

    def clamp(self, slots: int) -> int:
        return max(self.min_slots, min(self.max_slots, slots))


@dataclass(frozen=True)
class ScalingSettings:
    """Validated ``[scaling]`` settings (see the module docstring)."""

    enabled: bool = True
    interval: float = 5.0
    window: float = 60.0
    cpu_percent: float = 80.0
    queue_depth: float = 100.0
    response_time: float = 5.0
    hysteresis: float = 0.1
    swarm: bool = True
    hook_command: tuple[str, ...] = ()
    hook_url: str | None = None
    hook_timeout: float = 10.0
    hook_attempts: int = 3
    autoscale: bool = False
    min_slots: int = 1
    max_slots: int = 8
    grow_queue_depth: float = 1.0
    shrink_utilization: float = 0.5
    cooldown: float = 30.0
    models: Mapping[str, SlotBounds] = field(default_factory=dict)

    def threshold(self, trigger: str) -> float:
        """The threshold of ``trigger`` (one of :data:`TRIGGERS`)."""
        return {"cpu": self.cpu_percent, "queue_depth": self.queue_depth,
                "response_time": self.response_time}[trigger]

    def bounds(self, model: str) -> SlotBounds:
        """Autoscaling bounds of ``model`` (its own table, else the defaults)."""
        return self.models.get(model) or SlotBounds(self.min_slots, self.max_slots)

    @property
    def has_hook(self) -> bool:
        return bool(self.hook_command or self.hook_url)

    @classmethod
    def from_config(cls, config: NodeConfig,
                    env: Mapping[str, str] | None = None) -> ScalingSettings:
        """Read ``[scaling]`` (and the hook's environment variables).

        Raises:
            ConfigError: a bad value, named ``scaling.<key>``.
        """
        env = os.environ if env is None else env
        s = config.section("scaling")
        s.reject_unknown(_KEYS)
        min_slots = s.get_int("min_slots", 1, minimum=1, maximum=4096)
        max_slots = s.get_int("max_slots", 8, minimum=1, maximum=4096)
        if max_slots < min_slots:
            raise ConfigError(f"scaling.max_slots: must be >= min_slots ({min_slots}), "
                              f"got {max_slots}")
        url = env.get(ENV_HOOK_URL) or s.get_optional_str("hook_url")
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigError(f"scaling.hook_url: must be an http(s) URL, got {url!r}")
        return cls(
            enabled=s.get_bool("enabled", True),
            interval=s.get_float("interval", 5.0, minimum=0.01, maximum=3600.0),
            window=s.get_float("window", 60.0, minimum=0.01, maximum=86400.0),
            cpu_percent=s.get_float("cpu_percent", 80.0, minimum=0.0, maximum=100.0),
            queue_depth=s.get_float("queue_depth", 100.0, minimum=0.0),
            response_time=s.get_float("response_time", 5.0, minimum=0.0),
            hysteresis=s.get_float("hysteresis", 0.1, minimum=0.0, maximum=0.99),
            swarm=s.get_bool("swarm", True),
            hook_command=_command(s, env),
            hook_url=url,
            hook_timeout=s.get_float("hook_timeout", 10.0, minimum=0.1, maximum=3600.0),
            hook_attempts=s.get_int("hook_attempts", 3, minimum=1, maximum=100),
            autoscale=s.get_bool("autoscale", False),
            min_slots=min_slots,
            max_slots=max_slots,
            grow_queue_depth=s.get_float("grow_queue_depth", 1.0, minimum=0.0),
            shrink_utilization=s.get_float("shrink_utilization", 0.5, minimum=0.0,
                                           maximum=1.0),
            cooldown=s.get_float("cooldown", 30.0, minimum=0.0, maximum=86400.0),
            models=_model_bounds(s.get_table("models"), min_slots, max_slots),
        )


def _command(s: Section, env: Mapping[str, str]) -> tuple[str, ...]:
    raw: object = env.get(ENV_HOOK_COMMAND) or s.raw("hook_command", [])
    if isinstance(raw, str):
        try:
            argv = shlex.split(raw)
        except ValueError as exc:
            raise ConfigError(f"scaling.hook_command: cannot split {raw!r}: {exc}") from None
    elif isinstance(raw, list) and all(isinstance(a, str) for a in raw):
        argv = list(raw)
    else:
        raise ConfigError("scaling.hook_command: must be a list of strings (argv) or a "
                          f"command line, got {raw!r}")
    if argv and not argv[0]:
        raise ConfigError("scaling.hook_command: the program name is empty")
    return tuple(argv)


def _model_bounds(table: Section, min_slots: int, max_slots: int) -> dict[str, SlotBounds]:
    out: dict[str, SlotBounds] = {}
    for name in table.data:
        sub = table.get_table(str(name))
        sub.reject_unknown(_MODEL_KEYS)
        lo = sub.get_int("min_slots", min_slots, minimum=1, maximum=4096)
        hi = sub.get_int("max_slots", max(max_slots, lo), minimum=1, maximum=4096)
        if hi < lo:
            raise ConfigError(f"{sub.name}.max_slots: must be >= min_slots ({lo}), got {hi}")
        out[str(name)] = SlotBounds(lo, hi)
    return out
