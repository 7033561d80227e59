"""``rlmem tiny-model OUT_DIR``: write a random tiny Qwen2 model and a character-level tokenizer."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny-model", help="write a random tiny Qwen2 model + char tokenizer (head_dim 64)")
    p.add_argument("out_dir")
    from rlmem.commands.common import at_least

    p.add_argument("--layers", type=at_least(1), default=2)
    p.add_argument("--hidden", type=at_least(64), default=256, help="hidden size; hidden / heads must be 64")
    p.add_argument("--heads", type=at_least(1), default=4)
    p.add_argument("--kv-heads", type=at_least(1), default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Checks the shape and the output directory first: a new or empty directory (never over a model)."""
    from pathlib import Path

    from rlmem.commands.common import CommandError
    from rlmem.models.tiny import make_tiny_model

    if args.hidden % args.heads or args.hidden // args.heads != 64:
        raise CommandError(f"--hidden {args.hidden} / --heads {args.heads} must be 64 (head_dim 64, as vLLM CPU needs)")
    if args.heads % args.kv_heads:
        raise CommandError(f"--kv-heads {args.kv_heads}: --heads ({args.heads}) must be a multiple of it")
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise CommandError(f"{out}: exists and is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise CommandError(f"{out}: directory exists and is not empty (choose a new directory)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CommandError(f"{out}: cannot create the directory: {e.strerror or e}") from None
    path = make_tiny_model(out, layers=args.layers, hidden=args.hidden, heads=args.heads,
                           kv_heads=args.kv_heads, seed=args.seed)
    print(f"wrote tiny model to {path}")
    return 0
