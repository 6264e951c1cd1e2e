#!/usr/bin/env bash
# The quick start: create or reuse .venv (scripts/setup.sh), then start a
# local swarm on the embedded model with `p2pinfer up`. It answers a demo
# prompt, streamed, as soon as the swarm is ready, prints the dashboard URL
# and a ready-to-paste `p2pinfer prompt` command, and keeps running until
# Ctrl-C. Running it again reuses the same network, demo user and data
# (under ~/.config/p2pinfer/cli/up, or $P2PINFER_CONFIG_DIR/up).
#
#   scripts/quickstart.sh                       # answer, then keep the swarm up
#   scripts/quickstart.sh --once                # answer, then stop (CI, tests)
#   scripts/quickstart.sh --prompt "Hi there"   # another prompt
#   scripts/quickstart.sh --workers 1 --port 8080   # other options go to `p2pinfer up`
#
# Environment: P2PINFER_UP_ONCE=1 is --once; P2PINFER_SKIP_SETUP=1 skips
# scripts/setup.sh when .venv is known to be ready.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${P2PINFER_SKIP_SETUP:-0}" != "1" ]; then
    scripts/setup.sh
fi

prompt="Explain peer-to-peer networks in one sentence."
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --prompt) prompt="$2"; shift 2 ;;
        --prompt=*) prompt="${1#--prompt=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done

exec .venv/bin/p2pinfer up --prompt "$prompt" ${args[@]+"${args[@]}"}
