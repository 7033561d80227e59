"""The training prompt stream: which problems a step gets, as a pure function of the stream position.

Epoch ``e`` is a permutation seeded by ``(seed, e)``, so any position (and so any resumed step) is
reproduced without replaying earlier steps, and nothing besides the step number is checkpointed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlmem.data.datasets import load_examples

COUNTDOWN_GENERATED = "countdown-generated"


def load_task_examples(source: str, split: str, limit: int | None, *, seed: int,
                       countdown: Any = None) -> list[dict]:
    """Problems of ``source``/``split`` in file/generator order.

    Generated Countdown takes the generator settings ``countdown`` (the run config's
    ``data.countdown`` section) for every split, so train and eval problems are the same kind, from
    disjoint seeds, with train leaks dropped from the test split."""
    if source == COUNTDOWN_GENERATED and countdown is not None:
        c = countdown
        return load_examples(COUNTDOWN_GENERATED, split, limit=limit, seed=c.seed,
                             num_examples=c.num_problems, num_numbers=(c.min_numbers, c.max_numbers),
                             number_range=(1, c.max_number), target_range=(c.min_target, c.max_target))
    return load_examples(source, split, limit=limit, seed=seed)


def prompt_indices(position: int, count: int, num_examples: int, seed: int, shuffle: bool) -> list[int]:
    """Indices of the ``count`` prompts starting at stream ``position``."""
    out = []
    for p in range(position, position + count):
        epoch, i = divmod(p, num_examples)
        if shuffle:
            perm = np.random.default_rng([seed & 0xFFFFFFFF, epoch, 0xDA7A]).permutation(num_examples)
            out.append(int(perm[i]))
        else:
            out.append(i)
    return out
