#!/usr/bin/env bash
# Every number and figure of docs/toy-reproduction.md, from the shipped warm start:
#   bash scripts/reproduce_toy.sh [OUT]          (default OUT=outputs/toy-reproduction; SEED=1)
# 1. four RL runs of configs/countdown-toy.yaml, two at a time (1 torch thread each):
#    NGC; the full-cache control (ε = 0, same steps); the causal-mask ablation; the token-loss-only ablation;
# 2. `rlmem eval` on the held-out split: every method on the warm start and on the full-cache RL model,
#    NGC on the NGC model and on both ablations, at ε = 0.5 and 0.75 (T = 1, 2 samples per problem);
# 3. the figures. Rerunning resumes: finished runs and eval cells are skipped.
# About 1 hour on an idle 2-core machine. SEED=2 bash scripts/reproduce_toy.sh OUT re-runs step 2 with
# another problem order and sampling seed (the RL runs are reused).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/toy-reproduction}
SEED=${SEED:-1}
RLMEM=.venv/bin/rlmem
STEPS=$(.venv/bin/python -c "import yaml; print(yaml.safe_load(open('configs/countdown-toy.yaml'))['trainer']['total_steps'])")
CKPT=checkpoints/step_$(printf %06d "$STEPS")/hf

train() {  # NAME OVERRIDES...: skipped when its final checkpoint exists
  local name=$1; shift
  if [ -d "$OUT/runs/$name/$CKPT" ]; then echo "[toy] $name: done"; return; fi
  "$RLMEM" train configs/countdown-toy.yaml "output_dir=$OUT/runs/$name" ray.torch_threads=1 \
      logging.progress_bar=false logging.wandb.mode=offline "$@" > "$OUT/logs/$name.log" 2>&1 \
    || { echo "[toy] $name failed: see $OUT/logs/$name.log"; return 1; }
  echo "[toy] $name: $(grep '^step' "$OUT/logs/$name.log" | tail -1 | cut -c1-90)"
}

evaluate() {  # MODEL NAME METHODS
  OMP_NUM_THREADS=1 "$RLMEM" eval --model "$1" --out "$OUT/eval-seed$SEED/$2" --methods "$3" --eps 0.5 0.75 \
      --task countdown-toy --n 2 --temperature 1 --top-p 1 --max-new-tokens 320 --delta 16 --block-size 4 \
      --window 4 --interoception --batch-size 128 --seed "$SEED" --no-progress > "$OUT/logs/eval-seed$SEED-$2.log" 2>&1 \
    || { echo "[toy] eval $2 failed: see $OUT/logs/eval-seed$SEED-$2.log"; return 1; }
  echo "[toy] eval $2 (seed $SEED):"; grep '^| ' "$OUT/eval-seed$SEED/$2/results.md"
}

mkdir -p "$OUT/logs"
train ngc & a=$!
train fullcache eviction.eps=0 eviction.curriculum.enabled=false eviction.interoception.enabled=false & b=$!
wait $a && wait $b
train causal learner.replay_mask=causal & a=$!
train tokenonly algorithm.mem_coef=0 & b=$!
wait $a && wait $b

ALL=full,ngc,knorm,keydiff,snapkv,tova,h2o,streamingllm,rkv
evaluate models/countdown-toy warmstart "$ALL" & a=$!
evaluate "$OUT/runs/fullcache/$CKPT" fullcache-rl "$ALL" & b=$!
wait $a && wait $b
evaluate "$OUT/runs/ngc/$CKPT" ngc-rl full,ngc & a=$!
evaluate "$OUT/runs/causal/$CKPT" causal-rl full,ngc & b=$!
wait $a && wait $b
evaluate "$OUT/runs/tokenonly/$CKPT" tokenonly-rl full,ngc

.venv/bin/python scripts/plot_toy.py curves "$OUT/training-curves.png" "NGC=$OUT/runs/ngc" \
    "full-cache RL=$OUT/runs/fullcache" "causal mask=$OUT/runs/causal" "mem_coef 0=$OUT/runs/tokenonly"
E=$OUT/eval-seed$SEED
.venv/bin/python scripts/plot_toy.py accuracy "$E/accuracy-vs-reduction.png" "NGC RL=$E/ngc-rl" \
    "warm start=$E/warmstart" "full-cache RL=$E/fullcache-rl" "causal mask=$E/causal-rl" "mem_coef 0=$E/tokenonly-rl"
