#!/usr/bin/env bash
# Collect into .whl/ (git-ignored, at most 64 MiB) the wheels a GPU machine without internet
# lacks: Python 3.12, x86-64, a preinstalled CUDA torch and the packages of its image
# (see scripts/gpu_check.sh, whose install stage installs them with --no-index --no-deps).
#
#   bash scripts/gpu_wheels.sh           # download / build into .whl/ (needs PyPI)
#   bash scripts/gpu_wheels.sh --list    # print what it would fetch, fetch nothing
#
# Versions are the local venv's ($PYTHON, default .venv/bin/python or python3), so the GPU
# machine runs what CI tests. DeepSpeed is published only as a source archive: its wheel is
# built here (DS_BUILD_OPS=0: pure Python, ops JIT-compiled where used). The others are
# downloaded for CPython 3.12 manylinux x86-64. Already on that image (not carried): torch,
# numpy, packaging, psutil, py-cpuinfo, msgpack, ninja, einops, tqdm, safetensors,
# tokenizers, transformers, pillow, opencv, matplotlib, typing-extensions, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEST=.whl
LIMIT_MIB=64

BUILT=(deepspeed)  # source-only on PyPI
DOWNLOADED=(megatron-core torchao pydantic pydantic-core annotated-types typing-inspection hjson)

version_of() {
  "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"
}

if [ "${1:-}" = "--list" ]; then
  for name in "${BUILT[@]}"; do echo "build    $name==$(version_of "$name")"; done
  for name in "${DOWNLOADED[@]}"; do echo "download $name==$(version_of "$name")"; done
  echo "into $DEST/ (limit ${LIMIT_MIB} MiB), for cp312 manylinux x86_64"
  exit 0
fi

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two stop the install
for name in "${BUILT[@]}"; do
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$name==$(version_of "$name")"
done
for name in "${DOWNLOADED[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "$name==$(version_of "$name")"
done
total=$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f 1)
ls -l "$DEST"
echo "total $(( total / 1024 / 1024 )) MiB in $DEST/"
if [ "$total" -gt $(( LIMIT_MIB * 1024 * 1024 )) ]; then
  echo "more than ${LIMIT_MIB} MiB: the device tool carries at most that much; drop a wheel" >&2
  exit 1
fi
