"""``rlmem rollout``: generate NGC rollouts with an engine (``--backend``) and write rollout records (JSONL)."""

from __future__ import annotations

import argparse

from rlmem.commands.common import (DTYPE_CHOICES, CommandError, add_backend_arg, add_eviction_args, add_sampling_args,
                                   as_flags, create_engine, eviction_from_args, generate, read_prompts,
                                   sampling_from_args)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rollout", help="generate rollouts with NGC eviction and write records (JSONL)")
    p.add_argument("--model", required=True, help="local HF model directory")
    p.add_argument("--prompts", required=True, help="JSONL with a 'prompt' text or 'messages' per line")
    p.add_argument("--out", required=True, help="output records (JSONL)")
    add_eviction_args(p)
    add_sampling_args(p)   # SamplingParams' fields and defaults
    g = p.add_argument_group("samples")
    g.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval", action="store_true", help="evaluation mode: deterministic top-k evictions")
    p.add_argument("--batch-size", type=int, default=16, help="sequences generated together")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)
    add_backend_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from rlmem.engine.sampling import SamplingParams
    from rlmem.eviction.record import write_jsonl
    from rlmem.models.loading import ModelLoadError, load_tokenizer

    cfg = eviction_from_args(args)
    try:
        sampling = SamplingParams.from_fields(sampling_from_args(args))
    except ValueError as e:
        raise CommandError(as_flags(str(e), "sampling")) from None
    if args.num_samples < 1 or args.batch_size < 1:
        raise CommandError("--num-samples and --batch-size must be >= 1")
    try:
        tokenizer = load_tokenizer(args.model)
    except ModelLoadError as e:
        raise CommandError(f"--model {e}") from None
    prompts = read_prompts(args.prompts, tokenizer)
    engine = create_engine(args.backend, args.model, args.dtype, args.seed)
    jobs = [(i, s) for i in range(len(prompts)) for s in range(args.num_samples)]
    records, tokens, seconds = [], 0, 0.0
    bar = tqdm(total=len(jobs), desc="rollout", unit="seq")
    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start: start + args.batch_size]
        t0 = time.perf_counter()
        out = generate(engine, [prompts[i][1] for i, _ in chunk], sampling, cfg, greedy_evictions=args.eval)
        seconds += time.perf_counter() - t0
        for (i, s), rec in zip(chunk, out):
            rec.extra.update(prompt_index=i, sample_index=s,
                             completion_text=tokenizer.decode(rec.completion_ids, skip_special_tokens=False))
            tokens += len(rec.completion_ids)
        records.extend(out)
        bar.update(len(chunk))
        bar.set_postfix(tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
    bar.close()
    write_jsonl(args.out, records)
    peaks = [r.extra["peak_kv"] for r in records]
    print(f"wrote {len(records)} records to {args.out}: {tokens} tokens in {seconds:.1f}s "
          f"({tokens / max(seconds, 1e-9):.0f} tokens/s); peak KV entries mean {sum(peaks) / len(peaks):.1f}, "
          f"max {max(peaks)}; rounds {sum(r.num_rounds for r in records)}")
    return 0
