"""countdown_reward is a real TRL reward function: one GRPOTrainer step on the tiny model."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow   # a full TRL trainer start-up and step (tens of seconds on CPU)


def test_grpo_one_step_with_countdown_reward(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rewards import countdown_reward, get_reward
    from rlmem.data import build_prompt, load_examples

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    examples = load_examples("countdown-generated", "train", num_examples=4, seed=0)
    ds = Dataset.from_list([{"prompt": build_prompt(e, tok, eviction_rate=0.5), "target": e["target"],
                             "numbers": e["numbers"]} for e in examples])
    calls = []

    def reward(completions, **kwargs):  # wraps the real function to observe TRL's call
        out = countdown_reward(completions, **kwargs)
        calls.append((len(completions), sorted(kwargs), out))
        return out
    reward.__name__ = "countdown_reward"

    cfg = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                     max_completion_length=8, max_steps=1, learning_rate=1e-4, logging_steps=1,
                     report_to=[], save_strategy="no", use_cpu=True, bf16=False, beta=0.0,
                     temperature=1.0, dataloader_num_workers=0, seed=0)
    def spread(completions, **_):   # differs between distinct completions: non-zero advantages
        return [float(sum(map(ord, str(c))) % 7) for c in completions]

    # a random model never solves Countdown: without `spread` every advantage would be zero and the
    # step would leave the weights where they were
    trainer = GRPOTrainer(model=model, reward_funcs=[reward, get_reward("countdown"), spread], args=cfg,
                          train_dataset=ds, processing_class=tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert calls, "TRL never called the reward"
    n, keys, out = calls[0]
    assert n == 4 and "target" in keys and "numbers" in keys and all(r in (0.0, 1.0) for r in out)
    assert any(k.startswith("rewards/countdown_reward") for h in trainer.state.log_history for k in h)
    after = dict(model.named_parameters())
    moved = max(float((after[n].detach() - w).abs().max()) for n, w in before.items())
    assert moved > 0, "GRPOTrainer's step left every weight unchanged"
