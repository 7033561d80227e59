"""KNorm (Devoto, Zhao, Scardapane, Minervini 2024, "A Simple and Effective L2 Norm-Based Strategy
for KV Cache Compression", EMNLP 2024, arXiv 2406.11430).

Rule: keys with a *small* L2 norm draw the most attention, so keep them:
``score_k = −mean_h ‖K[h, k]‖₂`` over the KV heads ``h``, on the post-RoPE keys (RoPE is a
rotation: it does not change the norm). No queries are needed.
"""

from __future__ import annotations

import torch

from rlmem.eviction.scorers.base import Scorer, ScoringInputs, register_scorer


@register_scorer
class KNormScorer(Scorer):
    name = "knorm"

    def scores(self, inp: ScoringInputs) -> torch.Tensor:
        return (-inp.keys.norm(dim=-1).mean(dim=1)).masked_fill(~inp.valid, 0.0)
