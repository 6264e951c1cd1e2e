#!/usr/bin/env bash
# Set up .venv (see setup.sh) and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k rpc -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
