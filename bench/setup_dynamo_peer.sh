#!/usr/bin/env bash
# Idempotently create the NVIDIA Dynamo 1.6.1 benchmark-peer venv at .peers/dynamo,
# exactly as /work/shared/peers/dynamo.md describes (~690 MB download, no torch).
# `pip install ai-dynamo` fails as published (aisimulate==0.13.0 is a PyPI placeholder),
# so the two wheels are installed by hand and the real dependencies listed explicitly.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEERS="$ROOT/.peers"
VENV="$PEERS/dynamo"
DL="$PEERS/dl"
PY="${PYTHON:-python3}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as m, sys
ok = m.version("ai-dynamo") == "1.6.1" and m.version("ai-dynamo-runtime") == "1.6.1"
import dynamo.frontend, dynamo.mocker, transformers  # noqa: F401
sys.exit(0 if ok else 1)
PY
then
    echo "dynamo peer venv already complete: $VENV"
    exit 0
fi

mkdir -p "$PEERS" "$DL"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
"$PIP" download --no-deps -d "$DL" ai-dynamo==1.6.1 ai-dynamo-runtime==1.6.1
"$PIP" install "$DL"/ai_dynamo_runtime-1.6.1-*.whl
"$PIP" install --no-deps "$DL"/ai_dynamo-1.6.1-py3-none-any.whl
"$PIP" install "aiohttp<4.0,>=3.14.3" "certifi>=2026.10.19" "kubernetes<33.0.0,>=32.0.1" \
  "msgspec>=0.19.0" "prometheus-client<1.0,>=0.23.1" "pyzmq>=26.0.0" "redis<9.0.0,>=6.2.0" \
  "tqdm>=4.0.0" "transformers>=4.56.0" "typing-extensions>=4.10.0" "zstandard<1.0,>=0.23.0"
"$VENV/bin/python" -c "import dynamo.frontend, dynamo.mocker; print('dynamo peer ready')"
