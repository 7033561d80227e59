"""Periodic evaluation: pass@k per ε, peak-KV reduction against the full cache, the picture."""

from __future__ import annotations

import json

import pytest

from train_helpers import tiny_run_config

EVAL = {"source": "countdown-generated", "split": "test", "limit": 2, "num_samples": 2, "k": [1, 2],
        "eps": [0.5], "max_new_tokens": 40, "temperature": 1.0}


@pytest.mark.slow
def test_training_run_evaluates_accuracy_against_compression(tiny_model_dir, tmp_path):
    from rlmem.train.driver import run_training

    cfg = tiny_run_config(tiny_model_dir, tmp_path / "run", eval=EVAL,
                          data={"reward": "train_helpers:always_correct"},
                          trainer={"total_steps": 2, "eval_every": 1, "save_every": 0, "log_every": 2})
    run_training(cfg)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        for eps in ("0", "0.5"):
            assert row[f"eval/eps_{eps}/pass@1"] == 1.0 and row[f"eval/eps_{eps}/pass@2"] == 1.0
            assert row[f"eval/eps_{eps}/pass@1_stderr"] == 0.0
        assert row["eval/eps_0/peak_kv_reduction"] == pytest.approx(1.0, abs=0.05)   # the baseline itself
        assert row["eval/eps_0.5/peak_kv_reduction"] > 1.0                           # eviction saves memory
        assert row["eval/eps_0.5/peak_kv_mean"] < row["eval/eps_0/peak_kv_mean"]
    evals = [json.loads(l) for l in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [(e["step"], e["eps"]) for e in evals] == [(0, 0.0), (0, 0.5), (1, 0.0), (1, 0.5)]
    png = tmp_path / "run" / "figures" / "accuracy_vs_compression_step_000001.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_eval_metrics_are_flattened_per_eps():
    from rlmem.train.evaluation import eval_metrics

    out = eval_metrics([{"eps": 0.0, "pass@1": 0.5}, {"eps": 0.25, "pass@1": 0.25, "peak_kv_reduction": 2.0}])
    assert out == {"eval/eps_0/pass@1": 0.5, "eval/eps_0.25/pass@1": 0.25, "eval/eps_0.25/peak_kv_reduction": 2.0}
