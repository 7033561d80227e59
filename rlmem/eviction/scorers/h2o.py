"""H2O (Zhang, Sheng, Zhou, Chen, Zheng, Cai, Song, Tian, Ré, Barrett, Wang, Chen 2023, "H2O:
Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models", NeurIPS 2023,
arXiv 2306.14048).

Rule: heavy hitters are the keys with the largest *accumulated* attention: every forward step
(the prompt's prefill included) adds, to each key it could see, the softmax attention weight it
received from each new query, averaged over all query heads (each with its KV group's keys). The
sum runs over every query since the key entered the cache (the engine compacts this state with
the keys). H2O also keeps a recent window: here it is the schedule's protected newest block(s)
(``protect_recent``, the same for every scorer); ``recent > 0`` additionally gives the newest
``recent`` alive keys +inf, so that their blocks are kept too.
"""

from __future__ import annotations

import torch

from rlmem.eviction.scorers.base import Scorer, ScoringInputs, register_scorer, window_attention


@register_scorer
class H2OScorer(Scorer):
    name = "h2o"
    observes = True

    def __init__(self, recent: int = 0):
        if recent < 0:
            raise ValueError(f"h2o: recent must be >= 0 (got {recent})")
        self.recent = recent

    def observe(self, query, keys, visible, scaling, state):
        att = window_attention(query, keys, visible, scaling)          # [B, Hkv, G, q, C]
        return state + att.mean(dim=(1, 2)).sum(dim=1).to(state.dtype)

    def scores(self, inp: ScoringInputs) -> torch.Tensor:
        if inp.state is None:
            raise ValueError("h2o: the engine passed no accumulated attention state")
        s = inp.state.to(inp.keys.dtype).masked_fill(~inp.valid, 0.0)
        if self.recent:
            rank_from_end = inp.valid.sum(dim=1, keepdim=True) - 1 - (torch.cumsum(inp.valid.long(), dim=1) - 1)
            s = s.masked_fill(inp.valid & (rank_from_end < self.recent), float("inf"))
        return s
