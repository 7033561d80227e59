"""Evaluation metrics: unbiased pass@k with its standard error; average peak-KV reduction.

pass@k (Chen et al. 2021): for a problem with ``n`` samples of which ``c`` are correct,
``1 - C(n-c, k) / C(n, k)``, computed as a stable product. Over problems: the mean, and its
standard error ``std(ddof=1) / sqrt(#problems)`` (the spread of per-problem estimates).

Peak KV (docs/design.md section 1, Metric): the largest number of entries a layer holds at any time.
**Choice:** the last token of a sequence is never fed (its K/V are never written: nothing is
generated after it), so a full-cache run of a ``p``-token prompt and ``c``-token completion peaks
at ``p + c - 1`` entries (``count_last_token=True`` gives ``p + c``). Average peak-KV reduction
= mean over prompts of ``peak_no_eviction(p_i, c_i_base) / peak_method_i``.

:func:`peak_kv_entries` is the one peak rule. Every peak goes through it with its own inputs: the
torch engine with the cache sizes it measures around each round, the vLLM engine with the worker's
counts, :func:`rlmem.eviction.record.peak_kv` with the counts a record's rounds imply, and
:func:`schedule_peak` with the counts the schedule predicts before anything runs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:   # imported where used: rlmem.eviction's record module imports this one
    from rlmem.eviction.policy import EvictionConfig


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples, ``c`` correct."""
    n, c, k = int(n), int(c), int(k)
    if n < 1 or not (0 <= c <= n):
        raise ValueError(f"need n >= 1 and 0 <= c <= n (got n={n}, c={c})")
    if not (1 <= k <= n):
        raise ValueError(f"need 1 <= k <= n (got k={k}, n={n})")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_summary(correct_counts: Sequence[int], n: int | Sequence[int], k: int) -> tuple[float, float]:
    """(mean pass@k over problems, its standard error). ``n`` may be per problem."""
    counts = list(correct_counts)
    if not counts:
        raise ValueError("no problems")
    ns = list(n) if isinstance(n, (list, tuple)) else [int(n)] * len(counts)
    if len(ns) != len(counts):
        raise ValueError(f"{len(ns)} sample counts for {len(counts)} problems")
    vals = [pass_at_k(ni, ci, k) for ni, ci in zip(ns, counts)]
    m = len(vals)
    mean = sum(vals) / m
    if m < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in vals) / (m - 1)
    return mean, math.sqrt(var / m)


def peak_kv_entries(written: int, rounds: Iterable[tuple[int, int, int]]) -> int:
    """Peak KV entries of a cache (docs/design.md section 1, Metric): the one peak rule.

    ``written``: positions ``0..written-1`` had their K/V written (``p + c - 1`` for a rollout: the
    last sampled token is never fed). ``rounds``: ``(t, before, after)`` for each round in order,
    the entries held just before round ``t`` (keys of positions ``< t`` not yet evicted) and just
    after it. Between rounds a cache only grows, one entry per fed token, so the peak is the largest
    ``before`` or the size at the end, ``after + written - t`` of the last round (``written`` when
    there was none). With several layers, pass each round's largest counts over the layers: that
    gives the largest per-layer peak.
    """
    peak, size, last = 0, 0, 0
    for t, before, after in rounds:
        peak = max(peak, int(before))
        size, last = int(after), int(t)
    return max(peak, size + int(written) - last)


def peak_no_eviction(prompt_len: int, completion_len: int, *, count_last_token: bool = False) -> int:
    """Peak KV entries of a full-cache run: ``p + c - 1`` (the last token is never fed)."""
    p, c = int(prompt_len), int(completion_len)
    if p < 0 or c < 0:
        raise ValueError(f"lengths must be >= 0 (got prompt {p}, completion {c})")
    total = p + c
    return total if count_last_token else max(total - 1, 0)


def schedule_peak(prompt_len: int, completion_len: int, cfg: EvictionConfig, *,
                  count_last_token: bool = False) -> int:
    """Peak KV entries per layer that the NGC schedule predicts (docs/design.md section 1, Metric).

    Walks the schedule with the policy's own functions (round times, block counts, keep count,
    kept slots), keeping the oldest eligible blocks. With ``protect_recent >= 1`` the short newest
    block is always kept, so the count is exact for any choice of blocks, which is what every
    engine measures; with ``protect_recent = 0`` it is exact when the short block is evicted (an
    upper bound otherwise).
    """
    from rlmem.eviction.policy import keep_count, kept_key_slots, num_blocks, round_times

    p, c = int(prompt_len), int(completion_len)
    fed = p + c if count_last_token else max(p + c - 1, 0)  # positions 0..fed-1 are written
    rounds, size, last = [], 0, 0
    # round_times(p, n) gives the rounds of an n-token sequence (x_{t_r} is fed, t_r < n - 1)
    for t in round_times(p, fed + 1, cfg):
        before = size + t - last
        n = num_blocks(before, cfg.block_size)
        m = keep_count(n, cfg.eps, cfg.protect_recent) - min(cfg.protect_recent, n)
        size, last = len(kept_key_slots(before, list(range(m)), cfg)), t
        rounds.append((t, before, size))
    return peak_kv_entries(fed, rounds)


def peak_kv_reduction(prompt_lens: Sequence[int], base_completion_lens: Sequence[int],
                      method_peaks: Sequence[int], *, count_last_token: bool = False) -> float:
    """Mean over prompts of ``peak_no_eviction(p_i, c_i_base) / method_peak_i``."""
    p, cb, mp = list(prompt_lens), list(base_completion_lens), list(method_peaks)
    if not (len(p) == len(cb) == len(mp)) or not p:
        raise ValueError(f"need equal non-zero lengths (got {len(p)}, {len(cb)}, {len(mp)})")
    ratios = []
    for pi, ci, mi in zip(p, cb, mp):
        if mi <= 0:
            raise ValueError(f"method peak must be > 0 (got {mi})")
        ratios.append(peak_no_eviction(pi, ci, count_last_token=count_last_token) / mi)
    return sum(ratios) / len(ratios)
