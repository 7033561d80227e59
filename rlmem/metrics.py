"""Evaluation metrics: unbiased pass@k with its standard error; average peak-KV reduction.

pass@k (Chen et al. 2021): for a problem with ``n`` samples of which ``c`` are correct,
``1 - C(n-c, k) / C(n, k)``, computed as a stable product. Over problems: the mean, and its
standard error ``std(ddof=1) / sqrt(#problems)`` (the spread of per-problem estimates).

Peak KV (DESIGN.md section 1, "Metric"): the largest number of entries a layer holds at any time.
**Choice:** the last token of a sequence is never fed (its K/V are never written: nothing is
generated after it), so a full-cache run of a ``p``-token prompt and ``c``-token completion peaks
at ``p + c - 1`` entries (``count_last_token=True`` gives ``p + c``). Average peak-KV reduction
= mean over prompts of ``peak_no_eviction(p_i, c_i_base) / peak_method_i``.
"""

from __future__ import annotations

import math
from typing import Sequence


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


def peak_no_eviction(prompt_len: int, completion_len: int, *, count_last_token: bool = False) -> int:
    """Peak KV entries of a full-cache run: ``p + c - 1`` (the last token is never fed)."""
    p, c = int(prompt_len), int(completion_len)
    if p < 0 or c < 0:
        raise ValueError(f"lengths must be >= 0 (got prompt {p}, completion {c})")
    total = p + c
    return total if count_last_token else max(total - 1, 0)


def schedule_peak(prompt_len: int, completion_len: int, *, delta: int, eps: float, block_size: int,
                  protect_recent: int = 1, count_last_token: bool = False) -> int:
    """Peak KV entries per layer under the NGC grow-then-evict schedule of DESIGN.md section 1.

    Simulates the entry count: rounds at ``t_1 = max(delta, p)``, ``t_{r+1} = t_r + delta``,
    each only if ``x_{t_r}`` will be fed; a round keeps ``K = clamp(round_half_up((1-eps) N),
    protect_recent, N)`` of ``N = ceil(T/b)`` blocks. With ``protect_recent >= 1`` the short
    newest block is always kept, so the kept count is exact; with ``protect_recent = 0`` it
    assumes full blocks were kept (an upper bound).
    """
    p, c = int(prompt_len), int(completion_len)
    n = p + c
    fed = n if count_last_token else max(n - 1, 0)  # positions 0..fed-1 are written
    if eps <= 0:
        return fed
    b = int(block_size)
    t = max(int(delta), p)
    size, pos, peak = 0, 0, 0
    while True:
        if t >= fed:  # no more rounds: x_t would not be fed
            size += fed - pos
            peak = max(peak, size)
            return peak
        size += t - pos
        pos = t
        peak = max(peak, size)
        nblocks = math.ceil(size / b)
        keep = min(max(math.floor((1 - eps) * nblocks + 0.5), protect_recent), nblocks)
        if keep >= nblocks:
            pass
        elif protect_recent >= 1:
            short = size - (nblocks - 1) * b
            size = short + (keep - 1) * b
        else:
            size = keep * b
        t += int(delta)


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
