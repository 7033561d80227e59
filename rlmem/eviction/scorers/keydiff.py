"""KeyDiff (Park, Jones, Morse, Goel, Lee, Xu, Wang 2025, "KeyDiff: Key Similarity-Based KV Cache
Eviction for Long-Context LLM Inference in Resource-Constrained Environments", arXiv 2504.15364).

Rule: keep the keys most *different* from the rest. Per KV head ``h``, the anchor is the mean of
the L2-normalised alive keys, ``a_h = mean_k K[h,k]/‖K[h,k]‖``, and
``score_k = −mean_h cos(K[h, k], a_h)`` (post-RoPE keys, alive keys only).
"""

from __future__ import annotations

import torch

from rlmem.eviction.scorers.base import Scorer, ScoringInputs, register_scorer


@register_scorer
class KeyDiffScorer(Scorer):
    name = "keydiff"

    def scores(self, inp: ScoringInputs) -> torch.Tensor:
        unit = torch.nn.functional.normalize(inp.keys, dim=-1)                   # [B, Hkv, C, d]
        v = inp.valid[:, None, :, None].to(unit.dtype)
        anchor = (unit * v).sum(dim=2, keepdim=True) / v.sum(dim=2, keepdim=True).clamp_min(1)
        cos = torch.nn.functional.cosine_similarity(unit, anchor.expand_as(unit), dim=-1)   # [B, Hkv, C]
        return (-cos.mean(dim=1)).masked_fill(~inp.valid, 0.0)
