#!/usr/bin/env bash
# Every number and figure of docs/toy-reproduction.md, from the shipped warm start:
#   bash scripts/reproduce_toy.sh [OUT]          (default OUT=outputs/toy-reproduction; SEED=1)
# 1. two RL runs of configs/countdown-toy.yaml side by side (1 torch thread each): NGC, and the
#    full-cache control (ε = 0, same steps);
# 2. `rlmem eval` on the held-out split at ε = 0.25, 0.5 and 0.75 (T = 1, 2 samples per problem):
#    every method on the warm start and on the full-cache RL model, NGC on the NGC model;
# 3. the paper's two ablations, ABLATION_STEPS (default 40) steps each, evaluated the same way, with
#    the NGC run's checkpoint at the same step: a causal mask in the learner instead of the replay
#    masks, and the token loss alone (mem_coef = 0);
# 4. the figures. Rerunning resumes: finished runs and eval cells are skipped.
# About an hour on an idle 2-core machine. SEED=2 bash scripts/reproduce_toy.sh OUT re-runs the
# evaluations with another problem order and sampling seed (the RL runs are reused).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/toy-reproduction}
SEED=${SEED:-1}
ABLATION_STEPS=${ABLATION_STEPS:-40}
RLMEM=.venv/bin/rlmem
read -r STEPS DELTA BLOCK WINDOW < <(.venv/bin/python -c "import yaml; c = yaml.safe_load(open('configs/countdown-toy.yaml')); \
e = c['eviction']; print(c['trainer']['total_steps'], e['delta'], e['block_size'], e['window'])")
ckpt() { echo "$OUT/runs/$1/checkpoints/step_$(printf %06d "$2")/hf"; }

train() {  # NAME STEPS OVERRIDES...: skipped when its final checkpoint exists
  local name=$1 steps=$2; shift 2
  if [ -d "$(ckpt "$name" "$steps")" ]; then echo "[toy] $name: done"; return; fi
  "$RLMEM" train configs/countdown-toy.yaml "output_dir=$OUT/runs/$name" ray.torch_threads=1 trainer.keep_last=3 \
      logging.progress_bar=false logging.wandb.mode=offline "trainer.total_steps=$steps" "$@" > "$OUT/logs/$name.log" 2>&1 \
    || { echo "[toy] $name failed: see $OUT/logs/$name.log"; return 1; }
  echo "[toy] $name: $(grep '^step' "$OUT/logs/$name.log" | tail -1 | cut -c1-90)"
}

evaluate() {  # MODEL NAME METHODS
  "$RLMEM" eval --threads 1 --model "$1" --out "$OUT/eval-seed$SEED/$2" --methods "$3" --eps 0.25 0.5 0.75 \
      --task countdown-toy --n 2 --temperature 1 --top-p 1 --max-new-tokens 320 --delta "$DELTA" \
      --block-size "$BLOCK" --window "$WINDOW" --batch-size 128 --seed "$SEED" --no-progress > "$OUT/logs/eval-seed$SEED-$2.log" 2>&1 \
    || { echo "[toy] eval $2 failed: see $OUT/logs/eval-seed$SEED-$2.log"; return 1; }
  echo "[toy] eval $2 (seed $SEED):"; grep '^| ' "$OUT/eval-seed$SEED/$2/results.md"
}

mkdir -p "$OUT/logs"
ALL=full,ngc,knorm,keydiff,snapkv,tova,h2o,streamingllm,streamingllm_prompt,rkv
train ngc "$STEPS" & a=$!
train fullcache "$STEPS" eviction.eps=0 eviction.curriculum.enabled=false & b=$!
wait $a && wait $b
evaluate models/countdown-toy warmstart "$ALL" & a=$!
evaluate "$(ckpt fullcache "$STEPS")" fullcache-rl "$ALL" & b=$!
wait $a && wait $b
evaluate "$(ckpt ngc 20)" ngc-rl-step20 full,ngc & a=$!   # the README's main job (save_every divides 20)
evaluate "$(ckpt ngc "$STEPS")" "ngc-rl-step$STEPS" full,ngc & b=$!
wait $a && wait $b

# ablations: NGC's checkpoint at the same step is the comparison (save_every divides ABLATION_STEPS)
train causal "$ABLATION_STEPS" learner.replay_mask=causal & a=$!
train tokenonly "$ABLATION_STEPS" algorithm.mem_coef=0 & b=$!
wait $a && wait $b
if [ "$ABLATION_STEPS" != "$STEPS" ]; then evaluate "$(ckpt ngc "$ABLATION_STEPS")" "ngc-rl-step$ABLATION_STEPS" full,ngc; fi
evaluate "$(ckpt causal "$ABLATION_STEPS")" causal-rl full,ngc & a=$!
evaluate "$(ckpt tokenonly "$ABLATION_STEPS")" tokenonly-rl full,ngc & b=$!
wait $a && wait $b

.venv/bin/python scripts/plot_toy.py curves "$OUT/training-curves.png" "NGC=$OUT/runs/ngc" \
    "full-cache RL=$OUT/runs/fullcache" "causal mask=$OUT/runs/causal" "mem_coef 0=$OUT/runs/tokenonly"
E=$OUT/eval-seed$SEED
.venv/bin/python scripts/plot_toy.py accuracy "$E/accuracy-vs-reduction.png" "NGC RL step 20=$E/ngc-rl-step20" \
    "NGC RL step $ABLATION_STEPS=$E/ngc-rl-step$ABLATION_STEPS" "warm start=$E/warmstart" "full-cache RL=$E/fullcache-rl"
.venv/bin/python scripts/plot_toy.py accuracy "$E/ablations.png" "NGC RL=$E/ngc-rl-step$ABLATION_STEPS" \
    "causal mask=$E/causal-rl" "mem_coef 0=$E/tokenonly-rl"
