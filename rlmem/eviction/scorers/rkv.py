"""R-KV (Cai, Xiao, Sun, Luo, Zhang, Wan, Li, Zhou, Chang, Gu, Dong, Anandkumar, Asi, Hu 2025,
"R-KV: Redundancy-aware KV Cache Compression for Reasoning Models", arXiv 2505.24133).

Rule, per KV head ``h`` over the alive keys, then averaged over the KV heads:

* importance ``I[h, k]``: softmax attention of the last ``w`` queries, averaged over the window
  and over the query heads of ``h``'s group, max-pooled along keys (kernel ``kernel_size``), as in
  SnapKV;
* redundancy ``R[h, k]``: ``S`` = cosine similarity of the keys with the diagonal set to 0; in
  each row ``k`` the entry of the *newest* key whose similarity exceeds ``threshold`` is also set
  to 0 (the latest copy of a repeated thought is not counted against it); ``R[h, k]`` = the
  softmax over keys of the row means of ``S``;
* ``score_k = mean_h (λ · I[h, k] − (1 − λ) · R[h, k])``, ``λ = mix_lambda`` (0.1 in the paper).
"""

from __future__ import annotations

import torch

from rlmem.eviction.scorers.base import Scorer, ScoringInputs, register_scorer, window_attention
from rlmem.eviction.scorers.snapkv import max_pool_keys


def redundancy(keys: torch.Tensor, valid: torch.Tensor, threshold: float) -> torch.Tensor:
    """R-KV's redundancy ``[B, Hkv, C]`` of the alive keys (0 where not valid)."""
    unit = torch.nn.functional.normalize(keys, dim=-1)
    sim = torch.matmul(unit, unit.transpose(-1, -2))                              # [B, H, C, C]
    c = sim.shape[-1]
    eye = torch.eye(c, dtype=torch.bool, device=sim.device)
    pair = valid[:, None, :, None] & valid[:, None, None, :]
    sim = sim.masked_fill(eye | ~pair, 0.0)
    similar = sim > threshold
    idx = torch.arange(c, device=sim.device)
    newest = torch.where(similar, idx, torch.full_like(idx, -1)).amax(dim=-1)     # [B, H, C]
    drop = similar & (idx == newest[..., None])
    sim = sim.masked_fill(drop, 0.0)
    n = valid.sum(dim=1).clamp_min(1).to(sim.dtype)[:, None, None]
    row_mean = sim.sum(dim=-1) / n
    row_mean = row_mean.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.softmax(row_mean, dim=-1).masked_fill(~valid[:, None, :], 0.0)


@register_scorer
class RKVScorer(Scorer):
    name = "rkv"

    def __init__(self, mix_lambda: float = 0.1, threshold: float = 0.5, kernel_size: int = 5):
        if not 0.0 <= mix_lambda <= 1.0:
            raise ValueError(f"rkv: mix_lambda must be in [0, 1] (got {mix_lambda})")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"rkv: kernel_size must be an odd integer >= 1 (got {kernel_size})")
        self.mix_lambda, self.threshold, self.kernel_size = mix_lambda, threshold, kernel_size

    def scores(self, inp: ScoringInputs) -> torch.Tensor:
        att = window_attention(inp.queries, inp.keys, inp.valid, inp.scaling).mean(dim=(2, 3))   # [B, Hkv, C]
        imp = max_pool_keys(att, inp.valid, self.kernel_size)
        red = redundancy(inp.keys, inp.valid, self.threshold)
        s = self.mix_lambda * imp - (1.0 - self.mix_lambda) * red
        return s.mean(dim=1).masked_fill(~inp.valid, 0.0)
