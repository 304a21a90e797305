#!/usr/bin/env bash
# Create .venv and install modus_mega with its test tools.
#   CPU machines (default): pins the CPU wheel torch==2.13.0 first, because an unpinned
#   torch pulls several GB of CUDA packages.
#   GPU machines: MODUS_GPU=1 scripts/install.sh keeps the torch you install yourself and
#   adds the [gpu] extra (Transformer Engine, flash-attn) and the CUDA extension.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
if [ "${MODUS_GPU:-0}" = "1" ]; then
  .venv/bin/python -m pip install -q --no-build-isolation -e ".[gpu,test]"
else
  .venv/bin/python -m pip install -q torch==2.13.0
  # --no-build-isolation: DeepSpeed's setup imports torch; an isolated build would fetch a CUDA torch.
  MODUS_SKIP_CUDA_EXT=1 .venv/bin/python -m pip install -q --no-build-isolation -e ".[test]"
fi
echo "installed into $(pwd)/.venv"
