#!/usr/bin/env bash
# Run `rlmem doctor` on a bare GPU machine (docs/gpu.md, "rlmem doctor").
#
# The machine has Python 3.12 with torch, transformers, triton, numpy, safetensors, tokenizers,
# pyyaml and pytest, and no network. What else rlmem needs (DeepSpeed, pydantic, hjson, ...)
# arrives as the wheels scripts/build_gpu_wheels.sh builds (wheels/gpu, about 6 MiB), installed
# with `pip install --no-index --target`; rlmem runs from this working tree (PYTHONPATH). Ray and
# vLLM do not travel: the checks that need them skip, saying so. Budget: under 8 minutes on one H200.
#
#   bash scripts/gpu_check.sh [--dry-run] [--wheels DIR] [--out DIR]
#
# --dry-run: say what would be installed and run, and exit 0 (works on a CPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
WHEELS="wheels/gpu"
OUT="gpu-check"
DRY=0
PY="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$OUT" in /*) ;; *) OUT="$ROOT/$OUT" ;; esac
SITE="$OUT/site-packages"
# doctor's own budget inside the 8 minutes: installs take seconds, the gpu-marked tests at most 420 s
DOCTOR=(env "PYTHONPATH=$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" timeout 460 "$PY" -m rlmem.cli doctor --budget 440 --out "$OUT")

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ "$DRY" = 1 ]; then
  echo "gpu_check (dry run): python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo missing))"
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "would install: no wheels in $WHEELS yet (build them with: bash scripts/build_gpu_wheels.sh $WHEELS)"
  else
    echo "would install ${#wheels[@]} wheels ($(du -sh "$WHEELS" | cut -f1)) into $SITE:"
    for w in "${wheels[@]}"; do echo "  $(basename "$w")"; done
  fi
  echo "would run: $PY -m pip install --no-index --no-deps --target $SITE $WHEELS/*.whl"
  echo "would run: ${DOCTOR[*]}"
  echo "report: $OUT/doctor.md and $OUT/doctor.json"
  exit 0
fi

"$PY" -c 'import torch, sys; assert torch.cuda.is_available(), "no CUDA device"; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}")'
if [ ${#wheels[@]} -eq 0 ]; then
  echo "error: no wheels in $WHEELS (build them on a networked machine: bash scripts/build_gpu_wheels.sh)" >&2
  exit 2
fi
mkdir -p "$SITE"
"$PY" -m pip install --quiet --no-index --no-deps --upgrade --target "$SITE" "${wheels[@]}"
start=$(date +%s)
set +e
"${DOCTOR[@]}"
rc=$?
set -e
echo "gpu_check: rlmem doctor exited $rc after $(( $(date +%s) - start )) s; report in $OUT/doctor.md"
exit $rc
