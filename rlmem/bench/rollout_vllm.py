"""Rollout throughput of the vLLM engine at a fixed KV memory: full cache vs NGC, plus the torch engine.

One vLLM engine with a fixed number of KV blocks (``num_gpu_blocks_override``) runs the same work
twice: every sequence with a full cache, then every sequence with NGC eviction. The work is sized
so the sequences outgrow the cache: a full-cache sequence needs ``ceil((p + n) / b)`` blocks at the
end, an NGC sequence about ``ceil(δ/ε / b) + 1`` whatever its length, so the same pool holds more
NGC sequences at once. Admission is by the blocks a sequence needs at its longest (full cache:
its whole length; NGC: the schedule's peak, :func:`rlmem.metrics.schedule_peak`), so neither
configuration is preempted (a preempted NGC rollout would be recomputed with a full cache). The
torch reference engine runs the same prompts for comparison. EOS is ignored so every configuration
generates the same number of tokens; ratios come from one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time


def run_vllm(args: argparse.Namespace) -> int:
    import torch

    from rlmem.commands.common import CommandError, eviction_from_args, load_model
    from rlmem.engine.reference import ReferenceEngine
    from rlmem.engine.registry import engine_unavailable_reason
    from rlmem.engine.sampling import SamplingParams
    from rlmem.models.tiny import make_tiny_model

    why = engine_unavailable_reason("vllm")
    if why is not None:
        raise CommandError(f"--backend vllm: {why}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = eviction_from_args(args)
    from rlmem.engine.vllm.engine import check_block_size, cuda_present

    try:
        check_block_size(cfg.block_size, cuda=cuda_present())
    except ValueError as e:
        raise CommandError(f"--block-size: {e}") from None
    model_dir = args.model or make_tiny_model(tempfile.mkdtemp(prefix="rlmem-bench-"), layers=2, hidden=256)
    model, tok = load_model(str(model_dir))
    prompts = [tok(f"Using the numbers {i} {i + 7} {2 * i + 3}, create an equation that equals {i + 40}.").input_ids
               for i in range(args.batch)]
    b = cfg.block_size
    rows = []
    print(f"rlmem bench rollout --backend vllm: {args.batch} sequences x {args.new_tokens} new tokens, "
          f"{args.kv_blocks} KV blocks of {b} tokens ({args.kv_blocks * b} token slots), NGC delta={cfg.delta} "
          f"eps={cfg.eps} window={cfg.window}; a full-cache sequence ends needing "
          f"{-(-(max(map(len, prompts)) + args.new_tokens) // b)} blocks, an NGC one about "
          f"{-(-int(cfg.delta / cfg.eps) // b) + 1}")
    from rlmem.metrics import schedule_peak

    p_max = max(map(len, prompts))
    for n_new in args.new_tokens_list:
        sampling = SamplingParams(temperature=1.0, max_new_tokens=n_new, seed=0)
        total = args.batch * n_new
        if not args.skip_torch:
            ref = ReferenceEngine(model, tok, seed=0, eos_token_ids=[])
            for name, ev in (("torch full cache", None), ("torch NGC", cfg)):
                t0 = time.perf_counter()
                ref.generate(prompts, sampling, ev)
                rows.append((n_new, name, total / (time.perf_counter() - t0), args.batch, "-"))
        from rlmem.engine.vllm.engine import VllmEngine

        eng = getattr(run_vllm, "engine", None) or VllmEngine(
            str(model_dir), seed=0, block_size=b, num_kv_blocks=args.kv_blocks, max_num_seqs=args.batch,
            ignore_eos=True, max_model_len=max(map(len, prompts)) + max(args.new_tokens_list) + 8)
        run_vllm.engine = eng
        eng.generate(prompts[:2], SamplingParams(max_new_tokens=4), cfg)   # start-up and warm-up
        caps = {"vllm full cache": args.kv_blocks // -(-(p_max + n_new) // b),
                "vllm NGC": args.kv_blocks // -(-(schedule_peak(p_max, n_new, cfg) + 1) // b)}
        for name, ev in (("vllm full cache", None), ("vllm NGC", cfg)):
            if caps[name] < 1:
                raise CommandError(f"--kv-blocks {args.kv_blocks}: too few for one {name} sequence")
            eng.set_max_running(min(caps[name], args.batch))
            recs = eng.generate(prompts, sampling, ev)
            s = eng.last_stats
            assert all(len(r.completion_ids) == n_new for r in recs)
            pre = sum(bool(r.extra.get("preempted")) for r in recs)
            rows.append((n_new, name, total / s.seconds, s.peak_running, pre))
    header = f"{'new tokens':>10} {'config':<17} {'tokens/s':>9} {'vs vllm full':>12} {'peak concurrent seqs':>21} {'preempted':>9}"
    print(header)
    print("-" * len(header))
    for n_new in args.new_tokens_list:
        mine = [r for r in rows if r[0] == n_new]
        full = next(r[2] for r in mine if r[1] == "vllm full cache")
        for _, name, tps, peak, pre in mine:
            print(f"{n_new:>10} {name:<17} {tps:>9.0f} {tps / full:>11.2f}x {peak:>21} {pre!s:>9}")
        ngc = next(r for r in mine if r[1] == "vllm NGC")
        print(f"{'':>10} vLLM NGC / vLLM full cache at {args.kv_blocks} KV blocks: {ngc[2] / full:.2f}x "
              f"(target >= 2x once sequences outgrow the cache)")
    eng = getattr(run_vllm, "engine", None)
    if eng is not None:
        eng.shutdown()
    return 0
