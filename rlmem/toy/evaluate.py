"""Held-out accuracy vs compression of a toy Countdown model, with the torch engine.

``python -m rlmem.toy.evaluate --model DIR --eps 0 0.5 0.75 --limit 188 --seed 1`` runs every
held-out problem (``countdown-toy`` test split, sampled with ``--seed``) ``--num-samples`` times
per ε: the full cache (ε = 0) and NGC rounds with deterministic top-k evictions
(``greedy_evictions=True``; the scorer from ``--scorer``, ``ngc`` by default). Tokens are greedy
(``--temperature 0``, i.e. top-1) or sampled. Prompts carry the interoception tag when ε > 0
(``--no-tag`` to drop it), as in training. It prints and writes one JSON row per ε: pass@1 and its
standard error (rlmem/metrics.py, over problems), and the average peak-KV reduction against the
full-cache run of the same problems (DESIGN "Metric"; sample ``j`` paired with sample ``j``).

It is the toy report's measuring tool until the general ``rlmem eval`` lands; it reuses the data
pipeline, the templates, the engine and the verifier, and adds no logic of its own beyond the loop.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

TOY_EVICTION = dict(delta=16, block_size=4, window=4, protect_recent=1, score_transform="log", tau=1.0)


def evaluate_model(model, tokenizer, *, eps_list: list[float], examples: list[dict], num_samples: int = 1,
                   temperature: float = 0.0, max_new_tokens: int = 320, seed: int = 0, scorer: str = "ngc",
                   tag: bool = True, batch_size: int = 64, eviction: dict | None = None) -> list[dict]:
    """One row per ε (the full cache first): pass@1, its standard error, peak-KV reduction, lengths."""
    import numpy as np

    from rewards.countdown import countdown_reward
    from rlmem.data.templates import build_prompt
    from rlmem.engine.reference import ReferenceEngine
    from rlmem.engine.sampling import SamplingParams
    from rlmem.eviction.policy import EvictionConfig
    from rlmem.eviction.record import peak_kv
    from rlmem.metrics import pass_at_k_summary, peak_kv_reduction

    base_cfg = EvictionConfig(**{**TOY_EVICTION, **(eviction or {})}, eps=0.5, scorer=scorer)
    engine = ReferenceEngine(model, tokenizer, seed=seed)
    rows = [ex for ex in examples for _ in range(num_samples)]
    greedy = temperature <= 0
    results, baseline = [], None
    for eps in sorted({0.0, *eps_list}):
        t0 = time.time()
        ev = replace(base_cfg, eps=eps) if eps > 0 else None
        prompts = [tokenizer.encode(build_prompt(ex, tokenizer, eviction_rate=eps if (tag and eps > 0) else None),
                                    add_special_tokens=False) for ex in rows]
        sampling = SamplingParams(temperature=1.0 if greedy else temperature, top_k=1 if greedy else 0,
                                  max_new_tokens=max_new_tokens, seed=seed)
        records = []
        for i in range(0, len(prompts), batch_size):
            records += engine.generate(prompts[i: i + batch_size], sampling, ev, greedy_evictions=True)
        texts = [tokenizer.decode(r.completion_ids, skip_special_tokens=False) for r in records]
        scores = countdown_reward(texts, target=[ex["target"] for ex in rows], numbers=[ex["numbers"] for ex in rows])
        correct = np.asarray(scores).reshape(len(examples), num_samples) >= 1.0
        peaks = [max(1, peak_kv(r)) for r in records]
        if baseline is None:
            baseline = ([len(r.prompt_ids) for r in records], [len(r.completion_ids) for r in records])
        mean, se = pass_at_k_summary(correct.sum(axis=1).astype(int).tolist(), num_samples, 1)
        results.append({"eps": eps, "scorer": scorer if eps > 0 else "full", "pass@1": mean, "pass@1_stderr": se,
                        "problems": len(examples), "samples_per_problem": num_samples,
                        "temperature": temperature, "peak_kv_mean": float(np.mean(peaks)),
                        "peak_kv_reduction": peak_kv_reduction(baseline[0], baseline[1], peaks),
                        "completion_length_mean": float(np.mean([len(r.completion_ids) for r in records])),
                        "seconds": round(time.time() - t0, 1)})
        print(json.dumps(results[-1]), flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    import torch

    from rlmem.data import load_examples
    from rlmem.models.loading import load_model_and_tokenizer

    ap = argparse.ArgumentParser(description="held-out accuracy vs compression of a toy Countdown model")
    ap.add_argument("--model", required=True)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--limit", type=int, default=None, help="problems (default: the whole test split, 188)")
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy tokens")
    ap.add_argument("--max-new-tokens", type=int, default=320)
    ap.add_argument("--seed", type=int, default=1, help="problem sample and sampling seed")
    ap.add_argument("--scorer", default="ngc")
    ap.add_argument("--no-tag", action="store_true", help="no interoception tag in the prompts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the rows as JSON lines here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tokenizer = load_model_and_tokenizer(a.model, "float32")
    examples = load_examples("countdown-toy", "test", seed=a.seed, limit=a.limit)
    rows = evaluate_model(model, tokenizer, eps_list=a.eps, examples=examples, num_samples=a.num_samples,
                          temperature=a.temperature, max_new_tokens=a.max_new_tokens, seed=a.seed,
                          scorer=a.scorer, tag=not a.no_tag)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "w") as f:
            for r in rows:
                f.write(json.dumps({"model": a.model, **r}) + "\n")


if __name__ == "__main__":
    main()
