"""Learner step cost: the NGC replay (per-layer masks + eviction log-probs on the graph) vs a plain causal step.

All configurations run in one process on the same model and the same batch of NGC records, so the
printed ratios are comparable even though absolute times vary between machines (benchmark on an
idle machine). A step is forward + Dr. GRPO loss + backward + AdamW. Rows:

- causal: a plain HF forward with its causal mask and the token loss (what a learner without NGC
  pays; this is the baseline of every ratio);
- replay, tokens only: the per-layer eviction masks (dense SDPA kernel), token loss;
- replay: masks plus the eviction log-probs recomputed on the graph, token + eviction loss (what
  an NGC learner pays);
- forward only, for the dense and FlexAttention kernels (FlexAttention has no CPU backward).
"""

from __future__ import annotations

import argparse
import tempfile

from rlmem.bench.timing import best_of
from rlmem.commands.common import add_eviction_args, at_least, eviction_from_args, load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local HF model dir (default: a fresh tiny 2-layer Qwen2)")
    p.add_argument("--batch", type=at_least(1), default=8, help="records per learner step")
    p.add_argument("--new-tokens", type=at_least(1), default=512, help="completion length of each record")
    add_eviction_args(p, defaults={"delta": 64, "block_size": 16, "window": 8})
    p.add_argument("--repeats", type=at_least(1), default=3, help="best of N timings per configuration")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch intra-op threads (default: torch's)")


def run(args: argparse.Namespace) -> int:
    import torch

    from rlmem.engine.reference import ReferenceEngine
    from rlmem.engine.sampling import SamplingParams, token_log_softmax
    from rlmem.learner.loss import eviction_loss, token_loss
    from rlmem.models.tiny import make_tiny_model
    from rlmem.learner.replay import replay_forward

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = eviction_from_args(args)   # flags before any model
    model_dir = args.model or make_tiny_model(tempfile.mkdtemp(prefix="rlmem-bench-"), layers=2, hidden=256)
    model, tok = load_model(model_dir)
    prompts = [tok(f"Using the numbers {i} {i + 7} {2 * i + 3}, create an equation that equals {i + 40}.").input_ids
               for i in range(args.batch)]
    records = ReferenceEngine(model, tok, seed=0, eos_token_ids=[]).generate(
        prompts, SamplingParams(max_new_tokens=args.new_tokens, seed=0), cfg)
    adv = torch.linspace(-1.0, 1.0, len(records))
    max_len = args.new_tokens
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    n = max(r.seq_len for r in records)
    ids = torch.zeros(len(records), n, dtype=torch.long)
    attn = torch.zeros(len(records), n, dtype=torch.long)
    for i, r in enumerate(records):
        ids[i, : r.seq_len] = torch.tensor(r.prompt_ids + r.completion_ids)
        attn[i, : r.seq_len] = 1
    tc = max(len(r.completion_ids) for r in records)
    src = torch.tensor([len(r.prompt_ids) - 1 for r in records])[:, None] + torch.arange(tc)[None]
    targets = torch.stack([torch.tensor(r.completion_ids) for r in records])
    tmask = torch.ones(len(records), tc, dtype=torch.bool)

    def causal_logprobs():
        logits = model(input_ids=ids, attention_mask=attn).logits
        logits = torch.gather(logits, 1, src[..., None].expand(-1, -1, logits.shape[-1]))
        return torch.gather(token_log_softmax(logits, 1.0), -1, targets[..., None]).squeeze(-1)

    def step(loss_fn):
        model.train()
        opt.zero_grad()
        loss_fn().backward()
        opt.step()

    def causal_loss():
        return token_loss(causal_logprobs(), None, tmask, adv, aggregation="constant", max_len=max_len)[0]

    def replay_loss(with_eviction: bool):
        def fn():
            out = replay_forward(model, records, compute_eviction=with_eviction)
            loss = token_loss(out.token_logprobs, None, out.token_mask, adv, aggregation="constant", max_len=max_len)[0]
            if with_eviction:
                loss = loss + eviction_loss(out.eviction_logprobs, None, out.round_mask, adv)[0]
            return loss
        return fn

    def forward_only(fn):
        def run_():
            model.eval()
            with torch.no_grad():
                fn()
        return run_

    rows = [
        ("causal step (baseline)", lambda: step(causal_loss)),
        ("replay step, tokens only", lambda: step(replay_loss(False))),
        ("replay step (NGC)", lambda: step(replay_loss(True))),
        ("causal forward", forward_only(causal_logprobs)),
        ("replay forward, dense", forward_only(lambda: replay_forward(model, records, kernel="sdpa"))),
        ("replay forward, flex", forward_only(lambda: replay_forward(model, records, kernel="flex"))),
    ]
    rounds = sum(r.num_rounds for r in records)
    print(f"rlmem bench learner: {len(records)} records x {n} tokens, {rounds} eviction rounds, model {model_dir}, "
          f"{torch.get_num_threads()} threads, NGC delta={cfg.delta} eps={cfg.eps} block={cfg.block_size} "
          f"window={cfg.window}; best of {args.repeats}")
    times = {}
    for name, fn in rows:
        fn()                                    # warm-up (allocations, FlexAttention block-mask code paths)
        times[name] = best_of(fn, args.repeats)
    header = f"{'configuration':<26} {'seconds':>9} {'vs causal':>10}"
    print(header)
    print("-" * len(header))
    for name, t in times.items():
        base = times["causal forward"] if "forward" in name else times["causal step (baseline)"]
        print(f"{name:<26} {t:>9.3f} {t / base:>9.2f}x")
    ratio = times["replay step (NGC)"] / times["causal step (baseline)"]
    masks = times["replay step, tokens only"] / times["causal step (baseline)"]
    print(f"NGC learner step = {ratio:.2f}x the causal step (target <= 1.3x); the masks alone cost "
          f"{masks:.2f}x, the eviction log-probs on the graph the remaining {ratio - masks:+.2f}x")
    return 0
