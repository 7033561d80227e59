"""``rlmem tiny-model OUT_DIR``: write a random tiny Qwen2 model and a character-level tokenizer."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny-model", help="write a random tiny Qwen2 model + char tokenizer (head_dim 64)")
    p.add_argument("out_dir")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256, help="hidden size; hidden / heads must be 64")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rlmem.models.tiny import make_tiny_model

    path = make_tiny_model(args.out_dir, layers=args.layers, hidden=args.hidden, heads=args.heads,
                           kv_heads=args.kv_heads, seed=args.seed)
    print(f"wrote tiny model to {path}")
    return 0
