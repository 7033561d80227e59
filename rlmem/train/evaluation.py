"""Periodic evaluation: accuracy (pass@k) against compression (peak-KV reduction), one point per ε.

For each ε of ``eval.eps`` (ε = 0, the full cache, is always run: it is the baseline of the
reduction) every evaluation problem gets ``eval.num_samples`` completions from the rollout workers,
with deterministic top-k evictions (evaluation mode), graded by the run's
verifier alone (shaping rewards are a training signal, not a score).

Peak-KV reduction (docs/design.md section 1, Metric): per problem, the full-cache peak for the baseline run's
completion length over the method's peak. **Choice** with ``n`` samples per problem: sample ``j``
of the method is paired with sample ``j`` of the ε = 0 run of the same problem (independent draws,
so the pairing is as good as any), and the ratio is averaged over all pairs, i.e. over samples and
then problems (equal ``n``). This uses integer lengths as ``rlmem.metrics.peak_kv_reduction``
expects, and the baseline's own reduction is exactly 1.0 (each sample over itself), which
averaging lengths first and rounding would not give.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlmem.run.config import RunConfig


def evaluate(cfg: RunConfig, rollout_workers: list, tokenizer, examples: list[dict], step: int) -> list[dict[str, Any]]:
    """One result dict per ε: ``eps``, ``accuracy``, ``pass@k`` / ``pass@k_stderr`` per k,
    ``peak_kv_mean``, ``peak_kv_reduction``, ``response_length_mean``."""
    from rlmem.eviction.record import peak_kv
    from rlmem.metrics import pass_at_k_summary, peak_kv_reduction
    from rlmem.train.curriculum import stage_at
    from rlmem.train.rollouts import compute_rewards, decode_completion, generate, prompt_text, sampling_params, step_seed

    e = cfg.eval
    if not examples:
        return []
    n = e.num_samples
    workers = len(rollout_workers)
    tagged = cfg.eviction.interoception.enabled
    rows = [ex for ex in examples for _ in range(n)]
    # pad so the rows split evenly over the workers; padding rows are dropped before grading
    pad = (-len(rows)) % workers
    results, baseline = [], None
    for eps in sorted({0.0, *e.eps}):
        ev = cfg.eviction_config(eps, stage_at(cfg.eviction, step).get("tau")) if eps > 0 else None
        texts_p = [prompt_text(ex, tokenizer, cfg, eps if tagged else None) for ex in rows]
        ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts_p]
        ids += ids[:1] * pad
        records, _ = generate(rollout_workers, ids, [ev] * len(ids),
                              lambda i: sampling_params(cfg, step_seed(cfg.seed, step, 1000 + i),
                                                        temperature=e.temperature, max_new_tokens=e.max_new_tokens),
                              greedy=True)
        records = records[: len(rows)]
        texts_c = [decode_completion(tokenizer, r.completion_ids) for r in records]
        _, verifier = compute_rewards(cfg, texts_c, rows, texts_p)
        correct = np.asarray(verifier).reshape(len(examples), n) >= 1.0
        comp = np.asarray([len(r.completion_ids) for r in records], dtype=float).reshape(len(examples), n)
        peaks = [max(1, peak_kv(r)) for r in records]
        if baseline is None:   # ε = 0 comes first: its (untagged) prompt and completion lengths, per sample
            baseline = ([len(r.prompt_ids) for r in records], [len(r.completion_ids) for r in records])
        res: dict[str, Any] = {"eps": eps, "accuracy": float(correct.mean()), "peak_kv_mean": float(np.mean(peaks)),
                               "response_length_mean": float(comp.mean()),
                               "peak_kv_reduction": peak_kv_reduction(
                                   baseline[0], baseline[1], peaks)}
        for k in e.k:
            mean, se = pass_at_k_summary(correct.sum(axis=1).astype(int).tolist(), n, k)
            res[f"pass@{k}"], res[f"pass@{k}_stderr"] = mean, se
        results.append(res)
    return results


def eval_metrics(results: list[dict[str, Any]]) -> dict[str, float]:
    """Flatten results into ``eval/eps_{ε}/{name}`` metrics for metrics.jsonl and W&B."""
    return {f"eval/eps_{r['eps']:g}/{k}": float(v) for r in results for k, v in r.items() if k != "eps"}
