"""Shared pieces of the training end-to-end tests: the smallest real run config, a learnable reward."""

from __future__ import annotations

from pathlib import Path

from rlmem.run.config import RunConfig, config_from_dict


def digit_reward(completions, **_) -> list[float]:
    """Fraction of digits in the completion: varies inside a group from the first step, so
    advantages (and gradients) are non-zero even for a random model that cannot solve Countdown."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def tiny_run_config(model_dir, output_dir, *overrides: str, **sections) -> RunConfig:
    """2 prompts x 2 rollouts, 24 new tokens, delta 8 / block 4 / window 4, fp32, local Ray."""
    data = {
        "output_dir": str(output_dir), "seed": 0,
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"source": "countdown-generated", "reward": "train_helpers:digit_reward",
                 "countdown": {"num_problems": 16, "min_numbers": 3, "max_numbers": 3, "seed": 0}},
        "rollout": {"backend": "torch", "num_workers": 1, "temperature": 1.0, "max_new_tokens": 24},
        "eviction": {"delta": 8, "eps": 0.5, "block_size": 4, "window": 4},
        "algorithm": {"prompts_per_step": 2, "rollouts_per_prompt": 2},
        "optimizer": {"lr": 1e-3},
        "learner": {"num_workers": 1, "zero_stage": 0, "micro_batch_size": 2, "dtype": "float32"},
        "ray": {"placement": "colocated", "num_cpus_per_actor": 0.5, "weight_sync_timeout_s": 60},
        "trainer": {"total_steps": 2, "save_every": 1, "keep_last": 3, "resume": "auto"},
        "logging": {"wandb": {"mode": "offline"}, "progress_bar": False, "sample_table_size": 2,
                    "mask_image_every": 1},
    }
    for sec, vals in sections.items():
        data.setdefault(sec, {}).update(vals)
    return config_from_dict(data, list(overrides))


def hf_state(path: str | Path) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype="float32")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def always_correct(completions, **_) -> list[float]:
    """A verifier that accepts everything (pins pass@k to 1 in evaluation tests)."""
    return [1.0] * len(completions)
