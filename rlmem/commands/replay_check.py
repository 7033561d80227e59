"""``rlmem replay-check``: replay records and report the largest rollout-vs-replay log-prob differences."""

from __future__ import annotations

import argparse


from rlmem.commands.common import (DTYPE_CHOICES, CommandError, add_backend_arg, add_eviction_args, as_flags, at_least,
                                   check_backend, check_fits, create_engine, eviction_from_args, generate, load_model, model_error,
                                   output_file, read_prompts, read_records)
from rlmem.dtypes import replay_tolerance


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay-check", help="replay records; exit 1 if log-probs differ beyond tolerance, 2 on bad input",
                       description="Replay rollout records through the learner's masked forward and compare log-probs. "
                       "Give a records file, or --prompts with --backend to generate records with that engine first "
                       "(checks the engine). Exit 0 within tolerance, 1 on MISMATCH, 2 on bad input.")
    p.add_argument("records", nargs="?", help="rollout records (JSONL); with --prompts, where to write them (optional)")
    p.add_argument("--model", required=True, help="the model that produced the records")
    p.add_argument("--prompts", default=None, help="generate records from these prompts (JSONL) with --backend first")
    add_backend_arg(p)
    add_eviction_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128, help="with --prompts: tokens per completion")
    p.add_argument("--temperature", type=float, default=1.0, help="with --prompts: sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="with --prompts: sampling seed")
    p.add_argument("--kernel", choices=["sdpa", "flex"], default="sdpa")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--tol", type=at_least(0.0, float), default=None,
                   help="max allowed |rollout - replay| log-prob difference (default: the dtype's, "
                        + ", ".join(f"{d} {replay_tolerance(d):g}" for d in DTYPE_CHOICES) + ")")
    p.set_defaults(func=run)


def check_records(model, records, *, kernel: str = "sdpa", batch_size: int = 8, progress: bool = True) -> dict:
    """Replay ``records`` in batches; return the max token / eviction differences and where they occur."""
    import torch
    from tqdm import tqdm

    from rlmem.learner.replay import replay_forward, rollout_logprobs

    worst = {"token": 0.0, "eviction": 0.0, "token_at": None, "eviction_at": None, "tokens": 0, "decisions": 0}
    n_layers = model.config.num_hidden_layers
    starts = range(0, len(records), batch_size)
    for start in tqdm(starts, desc="replay", unit="batch", disable=not progress):
        chunk = records[start: start + batch_size]
        with torch.no_grad():
            out = replay_forward(model, chunk, kernel=kernel)
        old = rollout_logprobs(chunk, n_layers, dtype=out.token_logprobs.dtype)
        dt = (out.token_logprobs - old.token_logprobs).abs().masked_fill(~out.token_mask, 0)
        de = (out.eviction_logprobs - old.eviction_logprobs).abs().masked_fill(~out.round_mask[..., None], 0)
        worst["tokens"] += int(out.token_mask.sum())
        worst["decisions"] += int(out.round_mask.sum()) * n_layers
        if dt.numel() and dt.max().item() > worst["token"]:
            i, t = divmod(int(dt.argmax()), dt.shape[1])
            worst["token"], worst["token_at"] = dt.max().item(), f"record {start + i}, completion token {t}"
        if de.numel() and de.max().item() > worst["eviction"]:
            i, rest = divmod(int(de.argmax()), de.shape[1] * de.shape[2])
            r, l = divmod(rest, de.shape[2])
            worst["eviction"], worst["eviction_at"] = de.max().item(), f"record {start + i}, round {r}, layer {l}"
    return worst


def _generate(args: argparse.Namespace, cfg, sampling, prompts: list[list[int]]) -> list:
    """Records from ``--prompts`` made by engine ``--backend`` (the check then tests that engine)."""
    from rlmem.eviction.record import write_jsonl

    engine = create_engine(args.backend, args.model, args.dtype, args.seed)
    records = []
    for start in range(0, len(prompts), args.batch_size):
        records += generate(engine, prompts[start: start + args.batch_size], sampling, cfg)
    if args.records:
        try:
            write_jsonl(args.records, records)
        except OSError as e:
            raise CommandError(f"{args.records}: cannot write: {e.strerror or e}") from None
    print(f"generated {len(records)} records with backend {args.backend}"
          + (f" (written to {args.records})" if args.records else ""))
    return records


def check_against_model(model_path: str, records: list, records_file: str | None) -> None:
    """Records made by another model, refused from the model's config.json before its weights
    load: a token id beyond its vocabulary, or rounds with another number of layers."""
    import json
    from pathlib import Path

    try:
        conf = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return   # a GGUF file, or no model there: the loader's own error comes next
    vocab, layers = conf.get("vocab_size"), conf.get("num_hidden_layers")
    for i, r in enumerate(records):
        ids = r.prompt_ids + r.completion_ids
        if isinstance(vocab, int) and ids and max(ids) >= vocab:
            raise CommandError(f"{records_file}: record {i} has token id {max(ids)} >= the vocab size {vocab} of "
                               f"--model {model_path}: records from another model?")
        n = len(r.eviction.rounds[0].layers) if r.eviction is not None and r.eviction.rounds else None
        if isinstance(layers, int) and n is not None and n != layers:
            raise CommandError(f"{records_file}: record {i} has eviction rounds over {n} layers but --model "
                               f"{model_path} has {layers} layers: records from another model?")


def run(args: argparse.Namespace) -> int:
    """Flags, prompts and records are checked (records against the model's config.json) before
    the model's weights load."""
    from rlmem.engine.sampling import SamplingParams
    from rlmem.eviction.record import RecordError
    from rlmem.eviction.scorers import is_learned
    from rlmem.models.loading import ModelLoadError, load_tokenizer

    if args.prompts:
        cfg = eviction_from_args(args)
        try:
            sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
        except ValueError as e:
            raise CommandError(as_flags(str(e), "sampling")) from None
        check_backend(args.backend, cfg)
        if args.records:
            output_file(args.records, "records file")
        try:
            tokenizer = load_tokenizer(args.model)
        except ModelLoadError as e:
            raise model_error("--model", e) from None
        prompts = [ids for _, ids in read_prompts(args.prompts, tokenizer)]
        check_fits(args.model, prompts, args.max_new_tokens, args.prompts)
        model, _ = load_model(args.model, args.dtype)
        records = _generate(args, cfg, sampling, prompts)
    elif not args.records:
        raise CommandError("give a records file, or --prompts (with --backend) to generate records first")
    else:
        records = read_records(args.records)
        check_against_model(args.model, records, args.records)
        model, _ = load_model(args.model, args.dtype)
    if not records:
        raise CommandError(f"{args.records}: no records")
    vocab = model.config.vocab_size
    for i, r in enumerate(records):
        if max(r.prompt_ids + r.completion_ids) >= vocab:
            raise CommandError(f"{args.records}: record {i} has token ids >= the model's vocab size {vocab}")
    tol = args.tol if args.tol is not None else replay_tolerance(args.dtype)
    try:
        w = check_records(model, records, kernel=args.kernel, batch_size=args.batch_size)
    except RecordError as e:
        raise CommandError(f"{args.records}: {e}") from None
    heuristic = sorted({r.eviction.config.scorer for r in records
                        if r.num_rounds and not is_learned(r.eviction.config.scorer)})
    print(f"replayed {len(records)} records ({w['tokens']} tokens, {w['decisions']} layer eviction decisions) "
          f"with kernel={args.kernel}, dtype={args.dtype}")
    print(f"max |token log-prob diff|    = {w['token']:.3e}" + (f"  ({w['token_at']})" if w["token_at"] else ""))
    print(f"max |eviction log-prob diff| = {w['eviction']:.3e}" + (f"  ({w['eviction_at']})" if w["eviction_at"] else ""))
    if heuristic:
        print(f"note: evictions by heuristic scorers {heuristic} are not actions of the policy: their masks are "
              "replayed (token log-probs checked), their eviction log-probs are not")
    ok = w["token"] <= tol and w["eviction"] <= tol
    print(f"{'OK' if ok else 'MISMATCH'}: tolerance {tol:g}")
    made_by = sorted({r.extra["sampled_by_step"] for r in records if "sampled_by_step" in r.extra})
    if made_by and not ok:   # training records (logging.records_every): sampled before their step's update
        if len(made_by) > 1:
            print(f"note: the file mixes records sampled by {len(made_by)} different weights: "
                  "check one step's records at a time")
        else:
            print("note: " + training_records_hint(args.records, made_by[0]))
    return 0 if ok else 1


def training_records_hint(records_file: str | None, k: int) -> str:
    """What to replay a training run's records with: the weights after step ``k`` sampled them.

    Those are the run's starting model (``k == 0``) or its checkpoint of step ``k``, which exists
    only when ``trainer.save_every`` divides ``k`` and rotation (``trainer.keep_last``) kept it. When
    it is gone the records cannot be replayed after the fact, but the learner replayed them during
    training with exactly those weights, and ``metrics.jsonl`` holds that step's differences."""
    from pathlib import Path

    from rlmem.run.checkpoint import CONFIG_FILE, HF_SUBDIR, checkpoint_dir
    from rlmem.run.logger import read_metrics

    head = f"these training records were sampled by the weights after step {k}, before step {k + 1}'s update"
    run_dir = Path(records_file).resolve().parent.parent if records_file else None
    if run_dir is None or not (run_dir / CONFIG_FILE).is_file():
        where = "the run's model.path" if k == 0 else f"<output_dir>/checkpoints/step_{k:06d}/{HF_SUBDIR}"
        return f"{head}: replay them with --model {where}"
    import yaml
    try:
        cfg = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
        start, resume = cfg.get("model", {}).get("path"), cfg.get("trainer", {}).get("resume")
    except (OSError, yaml.YAMLError, AttributeError):
        start = resume = None
    if k == 0:
        return f"{head}: replay them with --model {start} (the run's starting model)" if start else \
            f"{head}: replay them with --model <the run's model.path>"
    hf = checkpoint_dir(run_dir, k) / HF_SUBDIR
    if hf.is_dir():
        return f"{head}: replay them with --model {hf}"
    # a run branched from another run's checkpoint (trainer.resume=<dir>/checkpoints/step_k)
    branched = Path(str(resume)) / HF_SUBDIR if resume not in (None, "auto", "never") else None
    if branched is not None and Path(str(resume)).name == f"step_{k:06d}" and branched.is_dir():
        return f"{head}: replay them with --model {branched} (the checkpoint this run branched from)"
    try:
        row = next((r for r in read_metrics(run_dir) if r.get("step") == k + 1), {})
    except (OSError, ValueError):
        row = {}
    during = (row.get("replay/max_abs_logprob_diff"), row.get("replay/max_abs_eviction_logprob_diff"))
    text = (f"{head}, and the run keeps no checkpoint of step {k} ({hf.parent} is not there: trainer.save_every "
            "and keep_last decide which are kept), so they cannot be replayed now")
    if during[0] is not None:
        text += (f"; the learner replayed them during training with those weights: max |token log-prob diff| "
                 f"{during[0]:.3e}" + (f", eviction {during[1]:.3e}" if during[1] is not None else "")
                 + f" (metrics.jsonl, step {k + 1})")
    return text
