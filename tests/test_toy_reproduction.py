"""The toy reproduction's short run, end to end on the shipped warm start (docs/toy-reproduction.md).

The first test checks what the README's main job shows a newcomer. The eviction rate climbs to
0.5 by the curriculum. The rollouts replay exactly. The held-out evaluation finds the warm start
strong with a full cache and weak at ε = 0.5: memory matters on this task. The second test is
issue 10's bar, that the short run beats the warm start at the same ε. It is skipped with the
measured reason until the recipe gets there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# configs/countdown-toy.yaml shortened: ε capped at 0.5 from step 5 on
SHORT_RUN = ["trainer.total_steps=8", "trainer.eval_every=8", "trainer.save_every=8",
             "eviction.curriculum.steps_per_stage=2", "algorithm.rollouts_per_prompt=8", "eval.limit=48",
             "logging.mask_image_every=4", "logging.progress_bar=false", "logging.wandb.mode=offline"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from rlmem.train.config import load_config
    from rlmem.train.driver import run_training

    out = tmp_path_factory.mktemp("toy") / "run"
    cfg = load_config(ROOT / "configs" / "countdown-toy.yaml",
                      [f"output_dir={out}", f"model.path={ROOT / 'models' / 'countdown-toy'}", *SHORT_RUN])
    summary = run_training(cfg)
    return out, summary


def test_short_toy_run_evicts_up_to_half_exactly_and_memory_matters(short_run):
    out, summary = short_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    # eviction/eps is the mean over groups; with the cap at 0.5 groups draw ε ∈ {0.25, 0.5}
    assert steps[0]["eviction/eps"] == 0.0 and max(r["eviction/eps"] for r in steps) > 0.3
    assert all(r["eviction/eps"] <= 0.5 + 1e-9 for r in steps)
    # every step's rollouts replay exactly (tokens and evictions, fp32)
    assert max(r["replay/max_abs_logprob_diff"] for r in steps) < 1e-3
    assert max(r.get("replay/max_abs_eviction_logprob_diff", 0.0) for r in steps) < 1e-3
    # the warm start solves most problems with its full cache...
    assert steps[0]["accuracy/mean"] >= 0.4
    ev = {r["eps"]: r for r in map(json.loads, (out / "eval.jsonl").read_text().splitlines())}
    assert set(ev) == {0.0, 0.5, 0.75} and ev[0.0]["accuracy"] >= 0.3
    # ...and eviction at 0.5 costs most of it: what to keep is a real choice on this task
    assert ev[0.5]["accuracy"] < ev[0.0]["accuracy"] / 2 and ev[0.5]["peak_kv_reduction"] >= 1.8
    figures = {p.name for p in (out / "figures").iterdir()}
    assert "accuracy_vs_compression_step_000008.png" in figures and any(f.startswith("mask_") for f in figures)
    assert (Path(summary["checkpoint"]) / "hf" / "model.safetensors").is_file()


@pytest.mark.skip(reason="issue 10 open: 60 steps of NGC RL reach 2.7% ± 0.8% at ε = 0.5 against 0.8% for the "
                         "warm start and 5.1% for KeyDiff (docs/toy-reproduction.md); an 8-step run is not "
                         "expected to beat the warm start yet")
def test_short_toy_run_beats_the_warm_start_at_eps_half(short_run, tmp_path):
    import torch

    from rlmem.evaluation.runner import EvalSettings, run_eval

    _, summary = short_run
    torch.set_num_threads(1)

    def accuracy(path, name: str) -> float:
        """Held-out pass@1 at ε = 0.5 as the report measures it (`rlmem eval`, docs/toy-reproduction.md)."""
        s = EvalSettings(model=str(path), task="countdown-toy", out=str(tmp_path / name), methods=["ngc"], eps=[0.5],
                         n=2, max_new_tokens=320, seed=1, delta=16, block_size=4, window=4, temperature=1.0,
                         top_p=1.0, interoception=True, batch_size=64)
        return next(r["pass@1"] for r in run_eval(s, progress=False) if r["eps"] == 0.5)

    warm = accuracy(ROOT / "models" / "countdown-toy", "warm")
    trained = accuracy(Path(summary["checkpoint"]) / "hf", "trained")
    assert trained > warm, f"held-out pass@1 at eps 0.5: trained {trained:.3f} vs warm start {warm:.3f}"
