#!/usr/bin/env bash
# Build the wheels that scripts/gpu_check.sh installs on a bare GPU machine (no network there).
#
# Run on a machine with network access and this checkout's venv (.venv: its torch builds DeepSpeed's
# sdist into a pure-Python wheel, ops compiled just in time on the GPU machine). The target has
# Python 3.12 with torch, transformers, triton, numpy, safetensors, tokenizers, pyyaml and pytest;
# everything else rlmem's doctor and learner need travels here, cp312 binaries where compiled
# (pydantic-core, msgpack, psutil). Ray and vLLM are too large to travel: their checks skip.
#
#   bash scripts/build_gpu_wheels.sh [OUT_DIR]     (default: wheels/gpu; listed in .gitignore)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-wheels/gpu}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"

# Pure-Python or cp312 manylinux wheels, exact versions as tested here (DeepSpeed's requirements).
BINARY=(
  "pydantic==$("$PY" -c 'import importlib.metadata as m; print(m.version("pydantic"))')"
  "pydantic-core==$("$PY" -c 'import importlib.metadata as m; print(m.version("pydantic-core"))')"
  "annotated-types" "typing-inspection" "hjson" "py-cpuinfo" "psutil" "msgpack" "ninja" "einops"
)
"$PY" -m pip download --quiet --only-binary=:all: --no-deps --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any -d "$OUT" "${BINARY[@]}"

# DeepSpeed ships an sdist only: build it here without compiling any op (DS_BUILD_OPS=0).
DS_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" "deepspeed==$DS_VERSION"

ls -l "$OUT"
du -sh "$OUT"
