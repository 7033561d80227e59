"""TOVA (Oren, Hassid, Yarden, Adi, Schwartz 2024, "Transformers are Multi-State RNNs", EMNLP 2024,
arXiv 2401.06104): Token Omission Via Attention.

Rule: only the newest query votes. ``score_k`` = softmax attention of the last query (the newest
position of the scoring window) on alive key ``k``, averaged over all query heads (each with its
KV group's keys), as TOVA averages over heads.
"""

from __future__ import annotations

import torch

from rlmem.eviction.scorers.base import Scorer, ScoringInputs, register_scorer, window_attention


@register_scorer
class TOVAScorer(Scorer):
    name = "tova"

    def scores(self, inp: ScoringInputs) -> torch.Tensor:
        att = window_attention(inp.queries[:, :, -1:], inp.keys, inp.valid, inp.scaling)   # [B, Hkv, G, 1, C]
        return att.mean(dim=(1, 2, 3)).masked_fill(~inp.valid, 0.0)
