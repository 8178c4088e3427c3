#!/usr/bin/env bash
# Idempotently create the aiperf (NVIDIA's LLM benchmark client) venv at .peers/aiperf,
# used by bench/aiperf_trace.py to replay the Mooncake trace against `dynamo-bus serve`.
# aiperf is a client only (no torch, no GPU); a venv of its own keeps its pins away from
# the project's .venv.
set -euo pipefail
VENV="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.peers/aiperf"
SPEC="${AIPERF_SPEC:-aiperf==0.13.*}"

if [ -x "$VENV/bin/aiperf" ] && "$VENV/bin/python" -c \
    "import importlib.metadata as m, sys, aiperf; sys.exit(not m.version('aiperf').startswith('0.13.'))" \
    2>/dev/null; then
    echo "aiperf peer venv already complete: $VENV"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install "$SPEC"
"$VENV/bin/python" -c "import importlib.metadata as m, aiperf; print('aiperf', m.version('aiperf'), 'ready')"
