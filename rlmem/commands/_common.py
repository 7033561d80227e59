"""Argument groups and loaders shared by several subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = {"float32": "float32", "fp32": "float32", "float64": "float64", "fp64": "float64", "bfloat16": "bfloat16"}


def add_eviction_args(p: argparse.ArgumentParser, *, eps_default: float = 0.5) -> None:
    g = p.add_argument_group("eviction (DESIGN.md section 1)")
    g.add_argument("--delta", type=int, default=64, help="cadence δ in tokens")
    g.add_argument("--eps", type=float, default=eps_default, help="eviction rate ε in (0, 1]; 0 = full cache")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--window", type=int, default=8)
    g.add_argument("--protect-recent", type=int, default=1)
    g.add_argument("--score-transform", choices=["log", "linear"], default="log")
    g.add_argument("--tau", type=float, default=1.0)


def eviction_from_args(args: argparse.Namespace):
    from rlmem.eviction.policy import EvictionConfig

    return EvictionConfig(delta=args.delta, eps=args.eps, block_size=args.block_size, window=args.window,
                          protect_recent=args.protect_recent, score_transform=args.score_transform, tau=args.tau)


def load_model(path: str, dtype: str = "float32"):
    """Load an HF causal LM and its tokenizer from a local directory, with errors naming the path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not (p / "config.json").is_file():
        raise SystemExit(f"error: --model {path}: no config.json there (a local HF model directory is expected; "
                         "`rlmem tiny-model DIR` makes one)")
    model = AutoModelForCausalLM.from_pretrained(p, dtype=getattr(torch, DTYPES[dtype]))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(p)
    return model, tokenizer


def read_prompts(path: str, tokenizer) -> list[tuple[str, list[int]]]:
    """Prompts file: one JSON object per line with ``prompt`` (raw text) or ``messages`` (chat template)."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: --prompts {path}: file not found")
    from rlmem.jsonl import iter_json_lines

    out = []
    try:
        lines = list(iter_json_lines(p))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for where, obj in lines:
        if not isinstance(obj, dict):
            raise SystemExit(f"error: {where}: expected a JSON object")
        if "messages" in obj:
            msgs = obj["messages"]
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
                raise SystemExit(f"error: {where}: messages: expected a list of {{'role', 'content'}} objects")
            if not getattr(tokenizer, "chat_template", None):
                raise SystemExit(f"error: {where}: messages given but the tokenizer has no chat template")
            text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        elif isinstance(obj.get("prompt"), str):
            text = obj["prompt"]
        else:
            raise SystemExit(f"error: {where}: expected a string field 'prompt' or a 'messages' list")
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise SystemExit(f"error: {where}: prompt is empty after tokenization")
        out.append((text, ids))
    if not out:
        raise SystemExit(f"error: --prompts {path}: no prompts in file")
    return out
