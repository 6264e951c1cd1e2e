"""Every example under examples/ runs to completion by itself, as a user
would run it (a subprocess, the real model where the example uses it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .test_cli_main import ROOT, helper_env

EXAMPLES = ROOT / "examples"
LIMIT = 300.0

pytestmark = pytest.mark.slow


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args],
                          env=helper_env(), capture_output=True, text=True, timeout=LIMIT,
                          cwd=ROOT)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return done


def test_every_example_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(
        ["client.py", "embed_worker.py", "three_nodes.py", "custom_backend.py"])
    assert not (EXAMPLES / "__init__.py").exists()


def test_client() -> None:
    out = run_example("client.py", "--demo").stdout
    assert "answer: " in out and "stream: " in out
    assert "model:  smollm2 (1 worker(s), loaded)" in out
    assert "quota:  2 of 100 requests used" in out


def test_embed_worker() -> None:
    out = run_example("embed_worker.py", "--demo").stdout
    assert "hub -> embedded worker: " in out
    assert "custom RPC from the hub: {'app': 'embed-example', 'asked': 1" in out
    assert "app /status: smollm2 loaded, 1 free slot(s)" in out


def test_three_nodes(tmp_path: Path) -> None:
    out = run_example("three_nodes.py", "--dir", str(tmp_path / "lab")).stdout
    assert "gateway sees 2 workers serving smollm2" in out
    assert "answers per worker: b=" in out and ", c=" in out  # both workers answered
    assert "4 member(s)" in out  # a, b, c and the CLI's operator key
    # the homes are kept with --dir, and a second run reuses them
    again = run_example("three_nodes.py", "--dir", str(tmp_path / "lab")).stdout
    assert "created network" not in again and "answers per worker" in again


def test_custom_backend() -> None:
    out = run_example("custom_backend.py").stdout
    assert "models: [('calculator', 'calculator')]" in out
    assert "What is 12 * (3 + 4)? The answer is 84." in out
    assert "And 2 ** 10 - 24? The answer is 1000." in out
    assert "What is love? -> refused" in out
