"""``rlmem inspect RECORDS.jsonl``: show what a rollout evicted, as pictures and as text."""

from __future__ import annotations

import argparse

from rlmem.commands.common import CommandError, read_records


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="draw what a rollout evicted (per-layer strip + replay masks)")
    p.add_argument("records", help="rollout records (JSONL)")
    p.add_argument("--index", type=int, default=0, help="which record")
    p.add_argument("--out", default="inspect", help="output directory for the PNGs")
    p.add_argument("--tokenizer", default=None, help="model/tokenizer dir to print the surviving text")
    p.add_argument("--layer", type=int, default=0, help="layer whose surviving text is printed")
    p.add_argument("--retention", action="store_true",
                   help="instead of one record: how often each prompt position survives, over all records, "
                        "per layer, and the mean reward when it is kept or evicted")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rlmem.eviction.record import NEVER, evicted_at
    from rlmem.figures import plot_eviction_strip, plot_replay_mask

    records = read_records(args.records)
    tok = _tokenizer(args.tokenizer) if args.tokenizer else None   # checked before anything is printed
    if tok is not None:   # records of another model would decode to other (or unknown) text, silently
        for i, r in enumerate(records):
            top = max(r.prompt_ids + r.completion_ids, default=0)
            if top >= len(tok):
                raise CommandError(f"{args.records}: record {i} has token id {top}, beyond the {len(tok)} tokens of "
                                   f"--tokenizer {args.tokenizer}: records from another model?")
    if args.retention:
        return _retention(args, records, tok)
    if not 0 <= args.index < len(records):
        raise CommandError(f"--index {args.index}: {args.records} has {len(records)} records")
    rec = records[args.index]
    if rec.eviction is None or not rec.eviction.rounds:
        raise CommandError(f"record {args.index} has no eviction rounds (full cache); nothing to draw")
    n_layers = len(rec.eviction.rounds[0].layers)
    if not 0 <= args.layer < n_layers:
        raise CommandError(f"--layer {args.layer}: the record has {n_layers} layers")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out}: exists and is not a directory (the pictures go into a directory)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CommandError(f"--out {out}: cannot create the directory for the pictures: {e.strerror or e}") from None
    strip = plot_eviction_strip(rec, n_layers, out / f"record{args.index}_evictions.png")
    ea = evicted_at(rec, n_layers)
    mask = plot_replay_mask(ea, len(rec.prompt_ids), out / f"record{args.index}_replay_mask.png",
                            title=f"record {args.index}")
    cfg = rec.eviction.config
    print(f"record {args.index}: prompt {len(rec.prompt_ids)} + completion {len(rec.completion_ids)} tokens, "
          f"delta={cfg.delta} eps={cfg.eps} block={cfg.block_size} window={cfg.window} "
          f"protect_recent={cfg.protect_recent}, scorer={cfg.scorer}, reward={rec.reward}")
    print(f"{'round':>5} {'t':>6}  " + "  ".join(f"L{l}: N kept logp" for l in range(min(n_layers, 4))))
    for i, r in enumerate(rec.eviction.rounds):
        cells = [f"L{l}: {x.num_blocks:>2} {len(x.kept):>2} {x.logprob:7.2f}" for l, x in enumerate(r.layers[:4])]
        print(f"{i:>5} {r.t:>6}  " + "  ".join(cells))
    if tok is not None:
        ids = rec.prompt_ids + rec.completion_ids
        kept = (ea[args.layer] == NEVER).tolist()
        pieces = [tok.decode([t]) if k else "·" for t, k in zip(ids, kept)]
        print(f"layer {args.layer} at the end (· = evicted):\n" + "".join(pieces))
    print(f"wrote {strip} and {mask}")
    return 0


def _tokenizer(path: str):
    from rlmem.models.loading import ModelLoadError, load_tokenizer

    try:
        return load_tokenizer(path)
    except ModelLoadError as e:
        from rlmem.commands.common import model_error

        raise model_error("--tokenizer", e) from None


def _retention(args: argparse.Namespace, records: list, tok) -> int:
    from rlmem.evaluation.retention import format_retention, prompt_retention, with_rounds

    try:
        rows = prompt_retention(records)
    except ValueError as e:
        raise CommandError(f"{args.records}: {e}") from None
    labels = None
    if tok is not None:
        labels = [tok.decode([r.token_id]).strip() or repr(tok.decode([r.token_id])) for r in rows]
    print(f"{args.records}: {len(records)} rollouts, {len(with_rounds(records))} with eviction rounds (the others ended before the first "
          f"round and are left out); % of those in which each prompt position survived to the end, per layer "
          f"(tokens of the first one)")
    print(format_retention(rows, labels))
    return 0
