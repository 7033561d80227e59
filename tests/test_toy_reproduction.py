"""The README's short toy run, end to end: NGC RL from the shipped warm start must raise held-out
accuracy at ε = 0.5 above the warm start's own accuracy at ε = 0.5, measured here with the same
problems, seeds and evaluator (docs/toy-reproduction.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# The short run of the README (configs/countdown-toy.yaml with these overrides): ε capped at 0.5.
SHORT_RUN = ["trainer.total_steps=8", "trainer.eval_every=0", "trainer.save_every=0",
             "eviction.curriculum.steps_per_stage=2", "eviction.curriculum.retention_rates=[1.0, 0.75, 0.5]",
             "eviction.interoception.eps_choices=[0.25, 0.5]", "eval.limit=32",
             "logging.progress_bar=false", "logging.wandb.mode=offline"]


@pytest.mark.skip(reason="issue 10 open: the short run has not yet been shown to beat the shipped warm start "
                         "(8% pass@1 full cache) on this machine; enable once docs/toy-reproduction.md shows it")
def test_short_toy_run_beats_the_warm_start_at_eps_half(tmp_path):
    import torch

    from rlmem.evaluation.runner import EvalSettings, run_eval
    from rlmem.train.config import load_config
    from rlmem.train.driver import run_training

    cfg = load_config(ROOT / "configs" / "countdown-toy.yaml",
                      [f"output_dir={tmp_path / 'run'}", f"model.path={ROOT / 'models' / 'countdown-toy'}", *SHORT_RUN])
    summary = run_training(cfg)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("eviction/eps", 0.0) for r in rows) == pytest.approx(0.5)

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
