"""Generated pass-key retrieval tasks: problems whose answer lives only in the prompt's KV cache.

A five-digit key is hidden at a random depth in repetitive filler text (the classic pass-key test
of Mohtashami & Jaggi, "Landmark Attention", 2023); the question comes at the end. The key's
tokens are a handful among hundreds, so an eviction rule that drops them loses the answer: the
task measures what a cache keeps, not what a model knows.

Two variants:

* ``passkey``: answer right away. With the NGC schedule's first round right after prefill
  (``t_1 = max(δ, p)``), the prompt is compressed once before the answer is written.
* ``passkey-write``: the model must first write a short numbered list (about ``write_items``
  lines) and only then give the key, so several rounds fire *during decoding* and the key must
  survive each of them.

Every example is ``{"id", "prompt", "reward": "passkey", "task": "passkey", "answer": "12345",
"depth": float}``; the prompt is the full user message (no extra instruction is appended).
"""

from __future__ import annotations

import random

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
TOPICS = ("fruits", "animals", "colors", "countries", "tools", "vegetables", "sports", "musical instruments",
          "birds", "flowers", "trees", "cities")


def key_sentence(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def passkey_example(rng: random.Random, index: int, *, filler_repeats: int, write_items: int = 0,
                    variant: str = "passkey") -> dict:
    """One problem: the key at a uniformly random sentence boundary of ``filler_repeats`` filler blocks."""
    key = str(rng.randint(10000, 99999))
    slot = rng.randint(0, filler_repeats)
    parts = [FILLER] * filler_repeats
    parts.insert(slot, key_sentence(key))
    haystack = "".join(parts).strip()
    intro = "There is important information hidden in a lot of irrelevant text. Find it and memorize it."
    if write_items > 0:
        topic = rng.choice(TOPICS)
        ask = (f"First, write a numbered list of {write_items} {topic}, one per line. "
               "After the list, answer the question: What is the pass key?")
    else:
        ask = "What is the pass key?"
    return {"id": f"{variant}-{index}", "prompt": f"{intro}\n\n{haystack}\n\n{ask}", "reward": "passkey",
            "task": "passkey", "answer": key, "depth": slot / max(filler_repeats, 1)}


def generate_passkey(num_examples: int = 100, seed: int = 0, *, filler_repeats: int = 14, write_items: int = 0,
                     variant: str = "passkey") -> list[dict]:
    """``num_examples`` seeded problems; 14 filler blocks make prompts of about 300 tokens."""
    if num_examples < 1:
        raise ValueError(f"passkey: num_examples must be >= 1 (got {num_examples})")
    if filler_repeats < 1:
        raise ValueError(f"passkey: filler_repeats must be >= 1 (got {filler_repeats})")
    rng = random.Random(f"passkey-{seed}")
    return [passkey_example(rng, i, filler_repeats=filler_repeats, write_items=write_items, variant=variant)
            for i in range(num_examples)]
