"""Printing: rich tables and charts on stdout, progress and spinners on stderr.

rich is imported when something is printed, not when the CLI starts. Colour
and animation follow the terminal: piped output is plain text, and the
spinner only spins on a terminal.
"""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console
    from rich.table import Table

__all__ = [
    "bar_chart",
    "console",
    "err_console",
    "fmt_time",
    "print_json",
    "short_id",
    "spinner",
    "table",
]

BLOCKS = " ▏▎▍▌▋▊▉█"


def console() -> Console:
    """A console on stdout (plain when stdout is not a terminal)."""
    from rich.console import Console

    # Piped output is read by people too (| less): do not squeeze it into 80 columns.
    width = None if sys.stdout.isatty() else 160
    return Console(file=sys.stdout, highlight=False, soft_wrap=False, width=width)


def err_console() -> Console:
    """A console on stderr, for progress and notes."""
    from rich.console import Console

    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str,
                          ensure_ascii=False))


def note(message: str) -> None:
    """A line for the person at the terminal (stderr, so stdout stays data)."""
    err_console().print(message)


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]],
          *, justify: dict[str, str] | None = None) -> Table:
    """A rich table; numbers are right-aligned when ``justify`` says so. With
    empty column names it is a key/value list without a header."""
    from rich.table import Table

    t = Table(title=title, title_justify="left", header_style="bold",
              show_header=any(columns))
    for name in columns:
        t.add_column(name, justify=(justify or {}).get(name, "left"),  # type: ignore[arg-type]
                     overflow="fold")
    for row in rows:
        t.add_row(*["" if v is None else str(v) for v in row])
    return t


def bar_chart(points: Sequence[tuple[str, float]], *, width: int = 40,
              unit: str = "") -> list[str]:
    """A small horizontal bar chart, one line per ``(label, value)``."""
    if not points:
        return []
    top = max(v for _, v in points) or 1.0
    label_w = max(len(label) for label, _ in points)
    lines = []
    for label, value in points:
        eighths = round(value / top * width * 8)
        bar = BLOCKS[-1] * (eighths // 8) + (BLOCKS[eighths % 8] if eighths % 8 else "")
        shown = f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"
        lines.append(f"{label.ljust(label_w)} │{bar.ljust(width)} {shown}{unit}")
    return lines


def fmt_time(value: Any) -> str:
    """Epoch seconds (or an ISO string) as local ``YYYY-MM-DD HH:MM``."""
    if value is None or value == "":
        return "-"
    if isinstance(value, int | float):
        return datetime.datetime.fromtimestamp(float(value)).strftime("%Y-%m-%d %H:%M")
    return str(value).replace("T", " ")[:16]


def short_id(peer_id: str, n: int = 12) -> str:
    """The tail of a peer id, enough to tell peers apart."""
    return peer_id if len(peer_id) <= n else "…" + peer_id[-n:]


@contextmanager
def spinner(message: str) -> Iterator[Any]:
    """A spinner on stderr until the block ends or ``stop()`` is called on
    what it yields; nothing at all when stderr is not a terminal."""
    stream = sys.stderr

    class _Null:
        def stop(self) -> None:
            pass

    if not getattr(stream, "isatty", lambda: False)():
        yield _Null()
        return
    status = err_console().status(message, spinner="dots")
    status.start()
    try:
        yield status
    finally:
        status.stop()


def write(text: str) -> None:
    """Write streamed text to stdout at once."""
    out = sys.stdout
    out.write(text)
    out.flush()
