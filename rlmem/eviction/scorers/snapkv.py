"""SnapKV (Li, Huang, Yang, Venkitesh, Locatelli, Ye, Cai, Lewis, Chen 2024, "SnapKV: LLM Knows What
You are Looking for Before Generation", NeurIPS 2024, arXiv 2404.14469).

Rule: the last ``w`` queries (the observation window, the schedule's scoring window) vote for the
keys they attend to. Per KV head ``h``: ``a[h, k]`` = softmax attention on alive key ``k`` averaged
over the window's queries and over the query heads of ``h``'s group; it is max-pooled along the
keys (kernel ``kernel_size``, stride 1, same length) so that a selected key keeps its neighbours;
``score_k = mean_h pooled[h, k]``. SnapKV's own window keys are kept by the schedule's protected
newest block.
"""

from __future__ import annotations

import torch

from rlmem.eviction.scorers.base import Scorer, ScoringInputs, register_scorer, window_attention


def max_pool_keys(x: torch.Tensor, valid: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Max-pool ``x [B, H, C]`` along keys over the alive ones (invalid slots never win)."""
    if kernel_size <= 1:
        return x
    neg = torch.finfo(x.dtype).min
    padded = x.masked_fill(~valid[:, None, :], neg)
    pooled = torch.nn.functional.max_pool1d(padded, kernel_size, stride=1, padding=kernel_size // 2)
    return pooled[..., : x.shape[-1]]


@register_scorer
class SnapKVScorer(Scorer):
    name = "snapkv"

    def __init__(self, kernel_size: int = 5):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"snapkv: kernel_size must be an odd integer >= 1 (got {kernel_size})")
        self.kernel_size = kernel_size

    def scores(self, inp: ScoringInputs) -> torch.Tensor:
        att = window_attention(inp.queries, inp.keys, inp.valid, inp.scaling).mean(dim=(2, 3))   # [B, Hkv, C]
        return max_pool_keys(att, inp.valid, self.kernel_size).mean(dim=1).masked_fill(~inp.valid, 0.0)
