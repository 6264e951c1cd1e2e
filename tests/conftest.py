"""Shared fixtures: every test gets its own P2PINFER_HOME and a clean environment.
Helpers to run real nodes live in ``tests/helpers.py``."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

# py-libp2p logs harmless multi-line WARNINGs on every closed stream. Import
# it first: its import resets the "libp2p" logger to WARNING.
import libp2p  # noqa: F401
import pytest

logging.getLogger("libp2p").setLevel(logging.ERROR)
logging.getLogger("multiaddr").setLevel(logging.WARNING)

# A test run started in the background by a non-interactive shell (`cmd &`)
# inherits SIGINT ignored, and so would every process the tests start: the
# tests that press Ctrl-C on `p2pinfer up` and `p2pinfer prompt` would see it
# ignored. Restore the usual disposition, which children then inherit.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("P2PINFER_HOME", str(home))
    # Design-document variables from the developer's shell must not leak in.
    for var in ("DATABASE_URL", "WEB_SERVICE_PORT", "OLLAMA_URL", "OPENAI_API_KEY",
                "OPENAI_BASE_URL", "DEFAULT_RATE_LIMIT", "PREMIUM_RATE_LIMIT",
                "PROMETHEUS_PORT", "METRICS_ENABLED", "P2PINFER_ROLES", "P2PINFER_LISTEN",
                "P2PINFER_BOOTSTRAP", "P2PINFER_ANNOUNCE"):
        monkeypatch.delenv(var, raising=False)
    return home

