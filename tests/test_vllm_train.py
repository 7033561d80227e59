"""End to end: training with ``rollout.backend: vllm`` (a vLLM engine inside the Ray rollout actor)."""

from __future__ import annotations

import json

import pytest

from rlmem.engine.registry import engine_unavailable_reason
from train_helpers import tiny_run_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(engine_unavailable_reason("vllm") is not None,
                                 reason=f"vllm engine unavailable: {engine_unavailable_reason('vllm')}")]


def test_training_with_the_vllm_backend(tiny_model_dir, tmp_path):
    from rlmem.train.driver import run_training

    cfg = tiny_run_config(tiny_model_dir, tmp_path / "run",
                          rollout={"backend": "vllm", "max_new_tokens": 96},
                          eviction={"delta": 64, "eps": 0.5, "block_size": 32, "window": 5},
                          trainer={"total_steps": 2, "save_every": 2, "keep_last": 1, "resume": "auto"})
    summary = run_training(cfg)
    assert summary["steps"] == 2
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        # the learner replays the vLLM engine's records within fp32 tolerance, at step 1 on the weights
        # the learner synced into the running engine after step 0
        assert 0 <= r["replay/max_abs_logprob_diff"] <= 1e-4
        assert 0 <= r["replay/max_abs_eviction_logprob_diff"] <= 1e-4
        assert r["eviction/rounds_mean"] > 0 and r["rollout/preempted_dropped"] == 0
        assert r["sync/buckets"] >= 1
    assert rows[0]["optim/grad_norm"] > 0     # step 0 moved the weights (later steps may see equal rewards)


def test_vllm_backend_refuses_a_block_size_vllm_cannot_use(tiny_model_dir, tmp_path):
    from rlmem.run.preflight import preflight

    cfg = tiny_run_config(tiny_model_dir, tmp_path / "run", rollout={"backend": "vllm"},
                          eviction={"delta": 16, "eps": 0.5, "block_size": 4, "window": 4})
    _, problems = preflight(cfg, load=False)
    assert problems and problems[0][0] == "rollout.backend" and "multiple of 32" in problems[0][1]
