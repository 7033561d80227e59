"""The per-step pieces shared by training and evaluation: prompts, generation fan-out over the
rollout workers, decoding, rewards and the step's rollout metrics.

Everything here is a plain function; only :func:`generate` talks to Ray (the workers' ``generate``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from rlmem.engine.sampling import SamplingParams
from rlmem.eviction.policy import EvictionConfig
from rlmem.run.config import RunConfig
from rlmem.run.errors import TrainingError


def step_seed(seed: int, step: int, worker: int) -> int:
    """The sampling seed of rollout worker ``worker`` at ``step`` (token and eviction sampling)."""
    return int(np.random.default_rng([seed & 0xFFFFFFFF, step, worker, 0x5EED]).integers(0, 2**62))


def split_even(items: list, parts: int) -> list[list]:
    """Contiguous, equal-sized parts (the config checked divisibility); groups stay contiguous."""
    n = len(items) // parts
    return [items[i * n:(i + 1) * n] for i in range(parts)]


def prompt_text(example: dict, tokenizer, cfg: RunConfig, eps: float | None) -> str:
    """The prompt of ``example`` per ``data.template``; with ``eps`` > 0 the interoception tag is added."""
    from rlmem.data.templates import build_prompt

    return build_prompt(example, tokenizer, template=cfg.data.template,
                        eviction_rate=eps if eps is not None and eps > 0 else None)


def sampling_params(cfg: RunConfig, seed: int, *, temperature: float | None = None,
                    max_new_tokens: int | None = None) -> SamplingParams:
    """The run's sampling settings (``rollout.*``), with the eval overrides when given."""
    r = cfg.rollout
    return SamplingParams(temperature=temperature or r.temperature, top_k=r.top_k or 0, top_p=r.top_p,
                          max_new_tokens=max_new_tokens or r.max_new_tokens, stop=list(r.stop), seed=seed)


def generate(workers: list, prompt_ids: list[list[int]], eviction: list[EvictionConfig | None],
             make_sampling, *, greedy: bool = False) -> tuple[list, float]:
    """One rollout per prompt, split contiguously over ``workers``; worker ``i`` samples with
    ``make_sampling(i)``. Returns the records in prompt order and the generated token count."""
    import ray

    n = len(workers)
    futs = [w.generate.remote(p, make_sampling(i), c, greedy)
            for i, (w, p, c) in enumerate(zip(workers, split_even(prompt_ids, n), split_even(eviction, n)))]
    results = ray.get(futs)
    return [r for recs, _ in results for r in recs], sum(s["new_tokens"] for _, s in results)


def decode_completion(tokenizer, ids: list[int]) -> str:
    """Completion text for the verifier: special tokens kept (``<answer>`` may be one), final EOS dropped."""
    eos = tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] == eos:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


def compute_rewards(cfg: RunConfig, texts: list[str], examples: list[dict], prompts: list[str]
                    ) -> tuple[list[float], list[float]]:
    """The configured verifier, TRL-style (completions plus the example columns as lists), plus the
    weighted shaping rewards. Returns ``(total, verifier)``: accuracy is measured on the verifier alone."""
    from rewards import get_reward

    cols: dict[str, list] = {}
    for k in examples[0]:
        if k not in ("prompt", "completions"):
            cols[k] = [ex.get(k) for ex in examples]

    def call(name: str, kwargs: dict) -> list[float]:
        out = get_reward(name)(texts, prompts=prompts, **cols, **kwargs)
        if len(out) != len(texts):
            raise TrainingError(f"reward {name!r} returned {len(out)} values for {len(texts)} completions")
        return [0.0 if v is None else float(v) for v in out]

    verifier = call(cfg.data.reward, cfg.data.reward_kwargs)
    total = list(verifier)
    for sh in cfg.data.shaping:
        total = [t + sh.weight * v for t, v in zip(total, call(sh.name, sh.kwargs))]
    return total, verifier


def rollout_metrics(records: Sequence[Any], rewards: list[float], verifier: list[float], group_eps: list[float],
                    num_layers: int) -> dict[str, float]:
    """Reward (with shaping), accuracy (verifier alone), lengths and eviction statistics of one step.

    ``eviction/kv_saving_vs_own_length`` is each rollout's full-cache peak *for its own length* over
    its measured peak: what eviction saved on the sequence actually generated. It is not the
    design's peak-KV reduction (whose baseline is a separate no-eviction run's length); evaluation
    measures that one (``eval/eps_*/peak_kv_reduction``).
    """
    from rlmem.eviction.record import peak_kv
    from rlmem.metrics import peak_kv_reduction

    r = np.asarray(rewards, dtype=np.float64)
    comp = np.asarray([len(x.completion_ids) for x in records], dtype=np.float64)
    prm = np.asarray([len(x.prompt_ids) for x in records], dtype=np.float64)
    peaks = [max(1, peak_kv(x, num_layers)) for x in records]
    rounds = np.asarray([x.num_rounds for x in records], dtype=np.float64)
    finish = [x.extra.get("finish_reason", "") for x in records]
    return {
        "reward/mean": float(r.mean()), "reward/std": float(r.std()),
        "reward/verifier_mean": float(np.mean(verifier)),
        "accuracy/mean": float((np.asarray(verifier) >= 1.0).mean()),   # binary verifiers: 1 = correct
        "response_length/mean": float(comp.mean()), "response_length/max": float(comp.max()),
        "response_length/min": float(comp.min()), "prompt_length/mean": float(prm.mean()),
        "response/clipped_frac": float(np.mean([f == "length" for f in finish])),
        "eviction/eps": float(np.mean(group_eps)), "eviction/rounds_mean": float(rounds.mean()),
        "eviction/no_round_frac": float((rounds == 0).mean()),
        "eviction/peak_kv_mean": float(np.mean(peaks)), "eviction/peak_kv_max": float(np.max(peaks)),
        "eviction/kv_saving_vs_own_length": peak_kv_reduction(prm.astype(int).tolist(), comp.astype(int).tolist(),
                                                              peaks),
    }
