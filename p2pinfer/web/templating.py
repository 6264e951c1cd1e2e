"""The Jinja2 environment of the pages: autoescaping on for every template,
so user-supplied text (usernames, key names, prompts, answers) is always
escaped; a few filters for times and numbers."""

from __future__ import annotations

import datetime
from typing import Any

import jinja2

from .. import __version__

__all__ = ["make_environment"]


def _when(value: Any) -> str:
    if not isinstance(value, int | float):
        return "—"
    moment = datetime.datetime.fromtimestamp(float(value), datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "—"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "—"
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def _short(value: Any, size: int = 12) -> str:
    text = str(value or "")
    return text if len(text) <= size + 1 else text[:size] + "…"


def make_environment(title: str) -> jinja2.Environment:
    """The environment for ``p2pinfer/web/templates``."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("p2pinfer.web", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=_when, number=_number, duration=_duration, short=_short)
    env.globals.update(site_title=title, version=__version__)
    return env
