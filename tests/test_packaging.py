"""The package layout: what pip installs is what the source tree holds."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {"p2pinfer." + str(p.parent.relative_to(ROOT / "p2pinfer")).replace("/", ".")
             for p in (ROOT / "p2pinfer").glob("**/__init__.py") if p.parent != ROOT / "p2pinfer"}
    found |= {"p2pinfer", "p2pinfer.daemon", "p2pinfer.cli"}
    assert found == listed
    assert config["package-dir"] == {"p2pinfer": "p2pinfer", "p2pinfer.daemon": "daemon",
                                     "p2pinfer.cli": "cli"}


def test_examples_is_not_a_package() -> None:
    # py-libp2p installs a top-level `examples` module: ours must not shadow it
    assert not (ROOT / "examples" / "__init__.py").exists()


def test_no_bare_cli_or_daemon_module() -> None:
    import importlib.util

    for name in ("cli", "daemon"):
        spec = importlib.util.find_spec(name)
        assert spec is None or "site-packages" not in str(spec.origin or "")
