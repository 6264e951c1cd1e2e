#!/usr/bin/env bash
# ruff over the whole tree, and mypy (strict, pyproject's [tool.mypy]) over
# the three installed packages: p2pinfer, p2pinfer.cli and p2pinfer.daemon.
# cli/ and daemon/ install as subpackages of p2pinfer (package-dir), which
# mypy cannot map from the source tree, so it checks a tree of symlinks laid
# out as the installed package is. Needs .venv (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

.venv/bin/ruff check p2pinfer cli daemon tests benchmarks scripts examples

tree="$(mktemp -d)"
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/p2pinfer"
for entry in p2pinfer/*; do
    ln -s "$PWD/$entry" "$tree/p2pinfer/$(basename "$entry")"
done
ln -s "$PWD/cli" "$tree/p2pinfer/cli"
ln -s "$PWD/daemon" "$tree/p2pinfer/daemon"
.venv/bin/mypy --config-file pyproject.toml "$tree/p2pinfer"
