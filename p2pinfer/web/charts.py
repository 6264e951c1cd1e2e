"""Small inline SVG charts for the dashboard (pure functions, no JavaScript).

Every label is escaped here, and the SVG carries no inline styles or
scripts, so it passes the pages' Content-Security-Policy; colours come from
the stylesheet through class names (``chart``, ``bar``, ``axis``, ...).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from markupsafe import Markup, escape

__all__ = ["bar_chart", "day_range", "hbar_chart"]


def day_range(days: int, *, today: datetime.date | None = None) -> list[str]:
    """The last ``days`` dates (``YYYY-MM-DD``), oldest first, ending today (UTC)."""
    end = today or datetime.datetime.now(datetime.UTC).date()
    return [(end - datetime.timedelta(days=i)).isoformat() for i in range(days - 1, -1, -1)]


def _fmt(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:g}"


def bar_chart(points: Sequence[tuple[str, float]], *, title: str, width: int = 640,
              height: int = 200) -> Markup:
    """A vertical bar chart of ``(label, value)`` points, as an ``<svg>``."""
    top, bottom, left, right = 22, 26, 8, 8
    inner_w, inner_h = width - left - right, height - top - bottom
    peak = max((v for _, v in points), default=0) or 1
    n = max(len(points), 1)
    slot = inner_w / n
    bar_w = max(2.0, slot * 0.7)
    every = max(1, n // 7)  # at most ~8 x labels
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
             f"<title>{escape(title)}</title>",
             f'<line class="axis" x1="{left}" y1="{top + inner_h}" x2="{left + inner_w}" '
             f'y2="{top + inner_h}"/>']
    for i, (label, value) in enumerate(points):
        h = inner_h * (value / peak)
        x = left + i * slot + (slot - bar_w) / 2
        y = top + inner_h - h
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" '
                     f'height="{h:.1f}"><title>{escape(label)}: {escape(_fmt(value))}'
                     f"</title></rect>")
        if value:
            parts.append(f'<text class="value" x="{x + bar_w / 2:.1f}" y="{y - 4:.1f}" '
                         f'text-anchor="middle">{escape(_fmt(value))}</text>')
        if i % every == 0 or i == n - 1:
            short = label[5:] if len(label) == 10 and label[4] == "-" else label
            parts.append(f'<text class="label" x="{x + bar_w / 2:.1f}" '
                         f'y="{height - 8}" text-anchor="middle">{escape(short)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def hbar_chart(items: Sequence[tuple[str, float]], *, title: str, width: int = 640) -> Markup:
    """A horizontal bar chart, one row per ``(label, value)``."""
    row, label_w, pad = 26, 180, 8
    height = max(1, len(items)) * row + pad * 2
    peak = max((v for _, v in items), default=0) or 1
    inner = width - label_w - pad * 2 - 60
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
             f"<title>{escape(title)}</title>"]
    for i, (label, value) in enumerate(items):
        y = pad + i * row
        w = inner * (value / peak)
        shown = label if len(label) <= 24 else label[:23] + "…"
        parts.append(f'<text class="label" x="{label_w - 6}" y="{y + 17}" '
                     f'text-anchor="end">{escape(shown)}</text>')
        parts.append(f'<rect class="bar" x="{label_w}" y="{y + 4}" width="{max(w, 1):.1f}" '
                     f'height="{row - 8}"><title>{escape(label)}: {escape(_fmt(value))}'
                     f"</title></rect>")
        parts.append(f'<text class="value" x="{label_w + max(w, 1) + 6:.1f}" y="{y + 17}">'
                     f"{escape(_fmt(value))}</text>")
    parts.append("</svg>")
    return Markup("".join(parts))
