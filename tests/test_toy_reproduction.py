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

    from rlmem.data import load_examples
    from rlmem.models.loading import load_model_and_tokenizer
    from rlmem.toy.evaluate import evaluate_model
    from rlmem.train.config import load_config
    from rlmem.train.driver import run_training

    cfg = load_config(ROOT / "configs" / "countdown-toy.yaml",
                      [f"output_dir={tmp_path / 'run'}", f"model.path={ROOT / 'models' / 'countdown-toy'}", *SHORT_RUN])
    summary = run_training(cfg)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("eviction/eps", 0.0) for r in rows) == pytest.approx(0.5)

    examples = load_examples("countdown-toy", "test", seed=1)
    torch.set_num_threads(1)

    def accuracy(path) -> float:
        model, tok = load_model_and_tokenizer(path)
        res = evaluate_model(model, tok, eps_list=[0.5], examples=examples, num_samples=2, temperature=1.0, seed=1)
        return next(r["pass@1"] for r in res if r["eps"] == 0.5)

    warm = accuracy(ROOT / "models" / "countdown-toy")
    trained = accuracy(Path(summary["checkpoint"]) / "hf")
    assert trained > warm, f"held-out pass@1 at eps 0.5: trained {trained:.3f} vs warm start {warm:.3f}"
