"""NGC's learned scorer (Li et al. 2026, "Neural Garbage Collection", arXiv 2604.18002).

ψ_k = softmax attention weight of each window query on alive key k, over all alive keys (no causal
restriction inside the window), averaged over all query heads (GQA: each query head uses its KV
group's keys) and over the ``w`` window queries (docs/design.md section 1, Scoring). The block
logits built from ψ are the policy's action distribution: sampled with Gumbel-top-k in training,
scored with Plackett-Luce, and recomputed on the learner's autograd graph.
"""

from __future__ import annotations

import torch

from rlmem.eviction.scorers.base import Scorer, ScoringInputs, register_scorer, window_attention


@register_scorer
class NGCScorer(Scorer):
    name = "ngc"
    learned = True

    def scores(self, inp: ScoringInputs) -> torch.Tensor:
        probs = window_attention(inp.queries, inp.keys, inp.valid, inp.scaling)    # [B, Hkv, G, w, C]
        return probs.mean(dim=(1, 2, 3)).masked_fill(~inp.valid, 0.0)
