"""Metric samples on the wire and the swarm-wide exposition (sans-IO).

A node ships its registry to a collecting node as plain msgpack-able lists
(cheaper and more exact than re-parsing Prometheus text)::

    [[family name, type, help, [[sample name, {label: value}, value], ...]], ...]

:func:`encode_families` builds that from a ``CollectorRegistry``;
:func:`decode_families` checks it (names, types, sizes) before anything
trusts it. :class:`NodeSample` is one node's answer (or its absence),
:class:`SwarmSnapshot` one collection round, and :func:`render_swarm` turns a
snapshot into one Prometheus text exposition where every series of every
node carries a ``node`` label (a series that already had one keeps it as
``exported_node``, as Prometheus itself does).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = [
    "Family",
    "NodeSample",
    "Sample",
    "SwarmSnapshot",
    "decode_families",
    "encode_families",
    "render_swarm",
]

MAX_FAMILIES = 4000
MAX_SAMPLES = 100_000
MAX_LABELS = 32
MAX_STRING = 1024
TYPES = frozenset({"counter", "gauge", "histogram", "summary", "unknown", "info", "stateset",
                   "gaugehistogram"})
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]{0,199}$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]{0,99}$")


class Sample(NamedTuple):
    """One series value: sample name (with its suffix), labels, value."""

    name: str
    labels: dict[str, str]
    value: float


class Family(NamedTuple):
    """A metric family: name (without ``_total`` for counters), type, help, samples."""

    name: str
    type: str
    help: str
    samples: list[Sample]


def encode_families(registry: Collector, *, skip_created: bool = True) -> list[list[Any]]:
    """The registry's current families in wire form.

    ``_created`` samples (series creation timestamps) are left out by
    default: nothing here alerts on them and they double the payload.
    """
    out: list[list[Any]] = []
    for metric in registry.collect():
        samples = [
            [s.name, dict(s.labels), float(s.value)]
            for s in metric.samples
            if not (skip_created and s.name.endswith("_created"))
        ]
        out.append([metric.name, metric.type, metric.documentation, samples])
    return out


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"bad {what}: {str(value)[:80]!r}")
    return value


def decode_families(raw: Any) -> list[Family]:
    """Validate families received from a peer.

    Raises:
        ValueError: anything malformed or over the size limits.
    """
    if not isinstance(raw, list) or len(raw) > MAX_FAMILIES:
        raise ValueError(f"families must be a list of at most {MAX_FAMILIES} entries")
    out: list[Family] = []
    total = 0
    for entry in raw:
        if not isinstance(entry, list | tuple) or len(entry) != 4:
            raise ValueError("a family is [name, type, help, samples]")
        name, typ, doc, samples = entry
        _check_name(name, "metric name")
        if typ not in TYPES:
            raise ValueError(f"bad metric type {str(typ)[:40]!r}")
        if not isinstance(doc, str) or len(doc) > MAX_STRING:
            raise ValueError("bad help text")
        if not isinstance(samples, list):
            raise ValueError("samples must be a list")
        total += len(samples)
        if total > MAX_SAMPLES:
            raise ValueError("too many samples")
        parsed: list[Sample] = []
        for s in samples:
            if not isinstance(s, list | tuple) or len(s) != 3:
                raise ValueError("a sample is [name, labels, value]")
            sname, labels, value = s
            _check_name(sname, "sample name")
            if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
                raise ValueError("bad labels")
            for k, v in labels.items():
                if not isinstance(k, str) or not _LABEL.match(k):
                    raise ValueError(f"bad label name {str(k)[:40]!r}")
                if not isinstance(v, str) or len(v) > MAX_STRING:
                    raise ValueError("bad label value")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError("bad sample value")
            parsed.append(Sample(sname, dict(labels), float(value)))
        out.append(Family(name, str(typ), doc, parsed))
    return out


@dataclass
class NodeSample:
    """What one collection learned about one node.

    Attributes:
        peer_id: the node.
        up: it answered in time with well-formed metrics.
        families: its metric families (empty when down).
        health: its own health summary (roles, models, lag, ...).
        error: why it counts as down, if it does.
        seconds: how long asking it took.
    """

    peer_id: str
    up: bool
    families: list[Family] = field(default_factory=list)
    health: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    def values(self, sample_name: str) -> Iterator[tuple[dict[str, str], float]]:
        """``(labels, value)`` of every sample named ``sample_name``."""
        for fam in self.families:
            if not sample_name.startswith(fam.name):
                continue
            for s in fam.samples:
                if s.name == sample_name:
                    yield s.labels, s.value

    def value(self, sample_name: str, default: float | None = None) -> float | None:
        """The value of an unlabelled (or first) sample named ``sample_name``."""
        for _labels, value in self.values(sample_name):
            return value
        return default


@dataclass
class SwarmSnapshot:
    """One collection round over the swarm.

    Attributes:
        at: ``trio.current_time()`` when it finished.
        wall: ``time.time()`` when it finished.
        collector: the peer id of the collecting node.
        nodes: every known node, up or down, by peer id.
        models: model name -> number of up nodes where it is loaded.
    """

    at: float
    wall: float
    collector: str
    nodes: dict[str, NodeSample]
    models: dict[str, int] = field(default_factory=dict)

    def up_nodes(self) -> list[NodeSample]:
        return [n for n in self.nodes.values() if n.up]


def _with_node(labels: dict[str, str], node: str) -> dict[str, str]:
    out = dict(labels)
    if "node" in out:
        out["exported_node"] = out.pop("node")
    out["node"] = node
    return out


class _SwarmCollector:
    """A prometheus ``Collector`` over a snapshot plus extra families."""

    def __init__(self, snapshot: SwarmSnapshot, extra: Iterable[Family]) -> None:
        self.snapshot = snapshot
        self.extra = list(extra)

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for peer_id in sorted(self.snapshot.nodes):
            node = self.snapshot.nodes[peer_id]
            for fam in node.families:
                metric = merged.get(fam.name)
                if metric is None:
                    metric = merged[fam.name] = Metric(fam.name, fam.help, fam.type)
                elif metric.type != fam.type:
                    continue  # version skew between nodes: keep the first type seen
                for s in fam.samples:
                    metric.add_sample(s.name, _with_node(s.labels, peer_id), s.value)
        for fam in self.extra:
            metric = merged.get(fam.name)
            if metric is None:
                metric = merged[fam.name] = Metric(fam.name, fam.help, fam.type)
            for s in fam.samples:
                metric.add_sample(s.name, s.labels, s.value)
        yield from merged.values()


def render_swarm(snapshot: SwarmSnapshot, extra: Iterable[Family] = ()) -> bytes:
    """Prometheus text of every node's series with a ``node`` label, plus
    ``extra`` swarm-level families (kept as they are)."""
    return generate_latest(_SwarmCollector(snapshot, extra))


def finite(value: float | None) -> bool:
    """True for a real number (not None, NaN or infinite)."""
    return value is not None and math.isfinite(value)
