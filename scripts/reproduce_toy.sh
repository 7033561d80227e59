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
# 4. the figures;
# 5. stages 2 and 3 (report, sessions 6 and 7; the config's eviction.stages): the NGC model trained
#    on at ε = 0.5, 40 steps at eviction temperature τ = 0.5 then 120 at τ = 0.25, and the
#    full-cache control trained on to the same step (step 220); held-out NGC on the one, every
#    method on the other. Skip with STAGES=1.
# Rerunning resumes: finished runs and eval cells are skipped. Parts 1-4 take about an hour on an
# idle 2-core machine, part 5 about an hour and a half more. SEED=2 bash scripts/reproduce_toy.sh OUT re-runs the
# evaluations with another problem order and sampling seed (the RL runs are reused).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/toy-reproduction}
SEED=${SEED:-1}
ABLATION_STEPS=${ABLATION_STEPS:-40}
RLMEM=.venv/bin/rlmem
read -r STEPS DELTA BLOCK WINDOW < <(.venv/bin/python -c "import yaml; c = yaml.safe_load(open('configs/countdown-toy.yaml')); \
e = c['eviction']; print(c['trainer']['total_steps'], e['delta'], e['block_size'], e['window'])")
ckdir() { echo "$OUT/runs/$1/checkpoints/step_$(printf %06d "$2")"; }
ckpt() { echo "$(ckdir "$1" "$2")/hf"; }

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
train fullcache "$STEPS" eviction.eps=0 'eviction.stages=[]' eviction.curriculum.enabled=false & b=$!
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

[ "${STAGES:-3}" = 1 ] && exit 0
# 5. stages 2 and 3 are the config's eviction.stages (from step 61: ε 0.5, τ 0.5; from 101: τ 0.25):
# one run to S3_END, branched from the NGC run's checkpoint (a new directory: the runs above stay as
# they are); the control branches from the full-cache run's, so both have trained the same steps.
S3_END=${S3_END:-220}   # the report's step (fixed before any evaluation of it)
branch() {  # NAME SOURCE_CHECKPOINT: start from SOURCE, or go on from NAME's own checkpoints when it has some
  if compgen -G "$OUT/runs/$1/checkpoints/step_*" > /dev/null; then echo trainer.resume=auto; else echo "trainer.resume=$2"; fi
}
train stage3 "$S3_END" "$(branch stage3 "$(ckdir ngc "$STEPS")")" 'eval.eps=[0.5]' & a=$!
train fullcache-long "$S3_END" "$(branch fullcache-long "$(ckdir fullcache "$STEPS")")" eviction.eps=0 \
    'eviction.stages=[]' eviction.curriculum.enabled=false & b=$!
wait $a && wait $b
evaluate "$(ckpt stage3 "$S3_END")" "stage3-step$S3_END" full,ngc & a=$!
evaluate "$(ckpt fullcache-long "$S3_END")" "fullcache-rl-step$S3_END" "$ALL" & b=$!
wait $a && wait $b
.venv/bin/python scripts/plot_toy.py accuracy "$E/accuracy-vs-reduction-stage3.png" "NGC stage 3=$E/stage3-step$S3_END" \
    "warm start=$E/warmstart" "full-cache RL step $S3_END=$E/fullcache-rl-step$S3_END"
