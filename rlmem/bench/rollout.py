"""Rollout throughput: the NGC engine vs the same engine with a full cache vs HF ``generate``.

``--scorers snapkv,h2o`` (or ``all``) also times heuristic baseline scorers behind the same
schedule, with a "vs NGC" ratio (same keep counts and rounds; only the scoring differs).

All three run in one process on the same model and batch, so the printed ratios are comparable
even though absolute tokens/s vary between machines and runs (benchmark on an idle machine).
EOS is disabled so every configuration generates exactly the same number of tokens.
"""

from __future__ import annotations

import argparse
import tempfile

from rlmem.bench.timing import best_of
from rlmem.commands.common import add_eviction_args, at_least, eviction_from_args, load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local HF model dir (default: a fresh tiny 2-layer Qwen2)")
    p.add_argument("--batch", type=at_least(1), default=32, help="prompts generated together")
    p.add_argument("--new-tokens", type=at_least(1), nargs="+", default=[256, 1024], help="completion lengths to measure")
    # NGC settings sized for the default tiny model; flags and help come from EvictionConfig
    add_eviction_args(p, defaults={"delta": 64, "block_size": 16, "window": 8}, exclude=("scorer_args",))   # several scorers
    p.add_argument("--scorers", default="", help="comma-separated baseline scorers to time against NGC at the "
                   "same schedule ('all': every registered heuristic)")
    p.add_argument("--repeats", type=at_least(1), default=1, help="best of N timings per configuration")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--backend", choices=["torch", "vllm"], default="torch",
                   help="torch: reference engine vs HF generate; vllm: vLLM full cache vs vLLM NGC at a fixed "
                        "number of KV blocks (--kv-blocks), plus the torch engine on the same work")
    p.add_argument("--kv-blocks", type=at_least(1), default=40, help="--backend vllm: KV blocks of the engine (fixed memory)")
    p.add_argument("--skip-torch", action="store_true", help="--backend vllm: do not run the torch engine")


def baseline_scorers(spec: str) -> list[str]:
    """Scorer names of ``--scorers`` (``all`` = every registered one but NGC), validated."""
    from rlmem.commands.common import CommandError
    from rlmem.eviction.scorers import scorer_names

    known = [n for n in scorer_names() if n != "ngc"]
    names = known if spec.strip() == "all" else [x.strip() for x in spec.split(",") if x.strip()]
    bad = [n for n in names if n not in scorer_names()]
    if bad:
        raise CommandError(f"--scorers: unknown scorer {bad[0]!r}; registered: {', '.join(scorer_names())}")
    return [n for n in names if n != "ngc"]


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    if args.backend == "vllm":
        from rlmem.bench.rollout_vllm import run_vllm

        if args.eviction_block_size == 16:   # this benchmark's torch default; vLLM's CPU blocks are multiples of 32
            args.eviction_block_size = 32
        args.new_tokens_list = list(args.new_tokens)
        args.new_tokens = max(args.new_tokens)
        return run_vllm(args)

    from rlmem.engine.reference import ReferenceEngine
    from rlmem.engine.sampling import SamplingParams
    from rlmem.models.tiny import make_tiny_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(eviction_from_args(args, scorer_args={}), scorer="ngc")   # flags before any model
    scorers = baseline_scorers(args.scorers)
    model_dir = args.model or make_tiny_model(tempfile.mkdtemp(prefix="rlmem-bench-"), layers=2, hidden=256)
    model, tok = load_model(model_dir)
    prompts = [tok(f"Using the numbers {i} {i + 7} {2 * i + 3}, create an equation that equals {i + 40}.").input_ids
               for i in range(args.batch)]
    engine = ReferenceEngine(model, tok, seed=0, eos_token_ids=[])
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=8), cfg)   # warm-up

    # HF generate baseline: left padding, sampling, no early stop
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    attn = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()

    print(f"rlmem bench rollout: batch {args.batch}, model {model_dir}, {torch.get_num_threads()} threads, "
          f"NGC delta={cfg.delta} eps={cfg.eps} block={cfg.block_size} window={cfg.window} "
          f"(steady-state cache delta/eps = {cfg.delta / cfg.eps:.0f} entries)")
    header = (f"{'new tokens':>10} {'config':<20} {'tokens/s':>10} {'vs HF':>7} {'vs full':>8} {'vs NGC':>7} "
              f"{'peak KV (entries)':>18} {'peak cache MiB':>15}")
    print(header)
    print("-" * len(header))
    for n_new in args.new_tokens:
        sampling = SamplingParams(temperature=1.0, max_new_tokens=n_new, seed=0)
        total = args.batch * n_new
        res = {}
        t = best_of(lambda: model.generate(ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                                         max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=tok.pad_token_id),
                  args.repeats)
        res["HF generate"] = (total / t, width + n_new - 1, None)
        runs = [("engine full cache", None), ("engine NGC", cfg)]
        runs += [(f"engine {name}", dataclasses.replace(cfg, scorer=name)) for name in scorers]
        for name, ev in runs:
            recs = []
            t = best_of(lambda: recs.append(engine.generate(prompts, sampling, ev)), args.repeats)
            peaks = [r.extra["peak_kv"] for r in recs[-1]]
            res[name] = (total / t, max(peaks), engine.last_stats.peak_cache_bytes / 2**20)
        hf, full, ngc = res["HF generate"][0], res["engine full cache"][0], res["engine NGC"][0]
        for name, (tps, peak, mib) in res.items():
            mib_s = f"{mib:15.2f}" if mib is not None else f"{'-':>15}"
            print(f"{n_new:>10} {name:<20} {tps:>10.0f} {tps / hf:>6.2f}x {tps / full:>7.2f}x {tps / ngc:>6.2f}x "
                  f"{peak:>18} {mib_s}")
    return 0
