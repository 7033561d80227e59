"""``rlmem rollout``: generate NGC rollouts with an engine (``--backend``) and write rollout records (JSONL)."""

from __future__ import annotations

import argparse

from rlmem.commands.common import (DTYPE_CHOICES, CommandError, add_backend_arg, add_eviction_args, add_sampling_args,
                                   as_flags, at_least, check_backend, check_fits, create_engine, eviction_from_args, generate,
                                   lock_output_file, model_error, output_file, read_prompts,
                                   sampling_from_args)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rollout", help="generate rollouts with NGC eviction and write records (JSONL)")
    p.add_argument("--model", required=True, help="local HF model directory")
    p.add_argument("--prompts", required=True, help="JSONL with a 'prompt' text or 'messages' per line")
    p.add_argument("--out", required=True, help="output records (JSONL)")
    add_eviction_args(p)
    add_sampling_args(p)   # SamplingParams' fields and defaults
    g = p.add_argument_group("samples")
    g.add_argument("--num-samples", type=at_least(1), default=1, help="completions per prompt")
    g.add_argument("--seed", type=int, default=0, help="the engine's seed (default 0)")
    g.add_argument("--sampling-seed", type=at_least(0), default=None, metavar="S",
                   help="seed completions one by one: on vllm, completion j (prompts in file order, "
                        "--num-samples each) is sampled with seed S+j, the tokens `rlmem serve` gives a "
                        "request with \"seed\": S+j and the same settings; on torch, each batch's "
                        "generator starts at S + its first j (default: the engine's one generator)")
    g.add_argument("--eval", action="store_true", help="evaluation mode: deterministic top-k evictions")
    p.add_argument("--batch-size", type=at_least(1), default=16, help="sequences generated together")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)
    add_backend_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Every flag and file is checked before the model loads; ``--out`` is locked while this
    process writes it and is written whole at the end (Ctrl-C leaves it untouched)."""
    import sys

    from rlmem.engine.sampling import SamplingParams
    from rlmem.models.loading import ModelLoadError, load_tokenizer

    cfg = eviction_from_args(args)
    try:
        sampling = SamplingParams.from_fields(sampling_from_args(args))
    except ValueError as e:
        raise CommandError(as_flags(str(e), "sampling")) from None
    check_backend(args.backend, cfg)
    out = output_file(args.out)
    try:
        tokenizer = load_tokenizer(args.model)
    except ModelLoadError as e:
        raise model_error("--model", e) from None
    prompts = read_prompts(args.prompts, tokenizer)
    check_fits(args.model, [ids for _, ids in prompts], sampling.max_new_tokens, args.prompts)
    lock = lock_output_file(out)
    try:
        return _generate_and_write(args, cfg, sampling, tokenizer, prompts, out)
    except KeyboardInterrupt:
        print(f"\nrlmem rollout: interrupted; {args.out} not written", file=sys.stderr)
        return 130
    finally:
        lock.release()


def _generate_and_write(args, cfg, sampling, tokenizer, prompts, out) -> int:
    import dataclasses
    import os
    import time

    from tqdm import tqdm

    from rlmem.eviction.record import write_jsonl

    engine = create_engine(args.backend, args.model, args.dtype, args.seed)
    jobs = [(i, s) for i in range(len(prompts)) for s in range(args.num_samples)]
    records, tokens, seconds = [], 0, 0.0
    bar = tqdm(total=len(jobs), desc="rollout", unit="seq")
    try:
        for start in range(0, len(jobs), args.batch_size):
            chunk = jobs[start: start + args.batch_size]
            t0 = time.perf_counter()
            if args.sampling_seed is not None:   # the engine seeds sequence i of a call with seed + i
                sampling = dataclasses.replace(sampling, seed=args.sampling_seed + start)
            out_ = generate(engine, [prompts[i][1] for i, _ in chunk], sampling, cfg, greedy_evictions=args.eval)
            seconds += time.perf_counter() - t0
            for (i, s), rec in zip(chunk, out_):
                rec.extra.update(prompt_index=i, sample_index=s,
                                 completion_text=tokenizer.decode(rec.completion_ids, skip_special_tokens=False))
                tokens += len(rec.completion_ids)
            records.extend(out_)
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
    finally:
        bar.close()
    tmp = out.with_name(out.name + ".tmp")
    try:
        write_jsonl(out, records)
    except OSError as e:
        raise CommandError(f"--out {args.out}: cannot write: {e.strerror or e}") from None
    finally:
        if tmp.exists():   # an interrupted or failed write leaves no partial file behind
            os.unlink(tmp)
    peaks = [r.extra["peak_kv"] for r in records]
    print(f"wrote {len(records)} records to {args.out}: {tokens} tokens in {seconds:.1f}s "
          f"({tokens / max(seconds, 1e-9):.0f} tokens/s); peak KV entries mean {sum(peaks) / len(peaks):.1f}, "
          f"max {max(peaks)}; rounds {sum(r.num_rounds for r in records)}")
    return 0
