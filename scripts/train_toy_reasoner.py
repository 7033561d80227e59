"""Reproduce the toy Countdown reasoner's warm-start weights (see models/countdown-toy/README.md).

    .venv/bin/python scripts/train_toy_reasoner.py models/countdown-toy --steps 6000 --seed 0

Next-token prediction (SFT) on search traces: a small Qwen2 (RoPE, head_dim 64, 4 layers, hidden
128, 2 query heads, 1 KV head) trained from scratch on random-order search traces
(rlmem/data/toy.py) of the *train* split, loss on the completion only. The weights are saved as the
identical ``LlamaForCausalLM`` (:func:`as_llama`) so that ``AutoTokenizer`` keeps the word-level
tokenizer (rlmem/toy/tokenizer.py). Half of the prompts carry an interoception tag
(``<eviction_rate>50%</eviction_rate>``) that the trace ignores, so the tagged prompts of NGC
training are in distribution. Everything is seeded (problem order, traces, tags, initialisation,
dropout-free training), and the run is deterministic on one CPU thread: the same command
reproduces the same weights. This trainer serves the toy model only, so it lives with its command
rather than in the rlmem package.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

TAG_CHOICES = (0.25, 0.5, 0.75)


def make_model(tokenizer, *, layers: int = 4, hidden: int = 128, heads: int = 2, kv_heads: int = 1,
               max_positions: int = 1024):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=64, max_position_embeddings=max_positions, rope_theta=10000.0,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return Qwen2ForCausalLM(config)


def as_llama(model):
    """The same network as a ``LlamaForCausalLM`` (q/k/v biases, a zero o_proj bias): identical logits.

    Why: transformers 5's ``AutoTokenizer`` replaces the tokenizer of a ``qwen2`` checkpoint by a
    ``Qwen2Tokenizer``, whose pre-tokenizer splits numbers into digits (``96`` -> ``9 6``), so a
    Qwen2-typed checkpoint would be fed other tokens than it was trained on. A ``llama``-typed one
    keeps the saved word-level tokenizer.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, head_dim=64,
                         max_position_embeddings=c.max_position_embeddings, rope_theta=10000.0,
                         rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=True, attention_bias=True, mlp_bias=False,
                         pad_token_id=c.pad_token_id, eos_token_id=c.eos_token_id, bos_token_id=c.bos_token_id)
    out = LlamaForCausalLM(config)
    missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.endswith("o_proj.bias") for k in missing):
        raise RuntimeError(f"as_llama: unexpected {unexpected}, missing {missing}")
    with torch.no_grad():
        for layer in out.model.layers:
            layer.self_attn.o_proj.bias.zero_()
    return out


def training_example(example: dict, tokenizer, rng: random.Random) -> tuple[list[int], int]:
    """(token ids of prompt + trace + EOS, prompt length) for one problem, with a fresh trace."""
    from rlmem.data.templates import build_prompt
    from rlmem.data.toy import search_trace

    eps = rng.choice(TAG_CHOICES) if rng.random() < 0.5 else None
    prompt = build_prompt(example, tokenizer, eviction_rate=eps)
    trace = search_trace(example["numbers"], example["target"], rng)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(trace, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p_ids + c_ids, len(p_ids)


def stop_decision_ids(tokenizer) -> list[int]:
    """The tokens that follow every leaf value: its comparison with the target (``<``, ``>``, ``=``;
    ``=`` means stop). They carry the one decision that makes an answer, and they are a small part of
    the tokens; :func:`train` weights these labels up (``--stop-weight``)."""
    from rlmem.data.toy import COMPARISONS

    return [tokenizer.convert_tokens_to_ids(c) for c in COMPARISONS]


def batch_tensors(items: list[tuple[list[int], int]], pad_id: int):
    import torch

    n = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    labels = torch.full((len(items), n), -100, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for i, (seq, p) in enumerate(items):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, p: len(seq)] = torch.tensor(seq[p:])
        mask[i, : len(seq)] = 1
    return ids, labels, mask


def train(out_dir: str, *, steps: int, seed: int = 0, batch_size: int = 16, lr: float = 3e-3,
          warmup: int = 200, layers: int = 4, hidden: int = 128, heads: int = 2, kv_heads: int = 1,
          log_every: int = 50, threads: int = 1, save_every: int = 1000,
          stop_at: int | None = None, stop_weight: float = 1.0, command: str | None = None) -> Path:
    import torch

    from rlmem.data.toy import toy_problems
    from rlmem.toy.tokenizer import build_toy_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_toy_tokenizer()
    model = make_model(tokenizer, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads)
    model.train()
    problems = toy_problems("train", None, seed=seed)
    stop_ids = torch.tensor(stop_decision_ids(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    t0, order, pos, ema = time.time(), [], 0, None
    log = open(out / "train_log.jsonl", "w")

    def save(step: int) -> None:
        as_llama(model).save_pretrained(out)
        tokenizer.save_pretrained(out)
        model.generation_config.save_pretrained(out)
        (out / "warmstart.json").write_text(json.dumps(
            {"steps": step, "schedule_steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "warmup": warmup,
             "layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads,
             "train_problems": len(problems), "stop_weight": stop_weight,
             "command": command,
             "seconds": round(time.time() - t0, 1), "threads": threads}, indent=1))

    pending: list[list[tuple[list[int], int]]] = []
    for step in range(steps if stop_at is None else min(stop_at, steps)):
        if not pending:  # draw 8 batches at once and bucket them by length (less padding)
            pool = []
            for _ in range(8 * batch_size):
                if pos == len(order):
                    order, pos = list(range(len(problems))), 0
                    rng.shuffle(order)
                pool.append(training_example(problems[order[pos]], tokenizer, rng))
                pos += 1
            pool.sort(key=lambda it: len(it[0]))
            pending = [pool[i: i + batch_size] for i in range(0, len(pool), batch_size)]
            rng.shuffle(pending)
        items = pending.pop()
        ids, labels, mask = batch_tensors(items, tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        # token-mean cross-entropy, with the stop decisions counted stop_weight times
        weight = (target != -100).float() * torch.where(torch.isin(target, stop_ids), stop_weight, 1.0)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1).clamp(min=0),
                                               reduction="none").view_as(weight)
        loss = (ce * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        last = step + 1 == (steps if stop_at is None else min(stop_at, steps))
        if (step + 1) % log_every == 0 or last:
            row = {"step": step + 1, "loss": round(ema, 4), "lr": sched.get_last_lr()[0],
                   "seconds": round(time.time() - t0, 1)}
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(json.dumps(row), flush=True)
        if (step + 1) % save_every == 0 or last:
            save(step + 1)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stop-at", type=int, default=None, help="stop after this many steps of the --steps schedule")
    ap.add_argument("--stop-weight", type=float, default=1.0,
                    help="weight of the stop-or-continue label after every leaf (see stop_decision_ids)")
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--log-every", type=int, default=25)
    a = ap.parse_args(argv)
    train(a.out_dir, steps=a.steps, seed=a.seed, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
          layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, threads=a.threads,
          save_every=a.save_every, log_every=a.log_every,
          stop_at=a.stop_at, stop_weight=a.stop_weight,
          command=" ".join(["scripts/train_toy_reasoner.py", "OUT", *(sys.argv[2:] if argv is None else argv[1:])]))


if __name__ == "__main__":
    main()
