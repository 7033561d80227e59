"""StreamingLLM (Xiao, Tian, Chen, Han, Lewis 2024, "Efficient Streaming Language Models with
Attention Sinks", ICLR 2024, arXiv 2309.17453).

Rule: keep the first ``sinks`` tokens of the sequence (attention sinks, true positions
``< sinks``) and otherwise the most recent ones: ``score_k = +inf`` if ``position_k < sinks``,
else ``position_k`` (newer = higher). Only positions are used; no attention.
"""

from __future__ import annotations

import torch

from rlmem.eviction.scorers.base import Scorer, ScoringInputs, register_scorer


@register_scorer
class StreamingLLMScorer(Scorer):
    name = "streamingllm"

    def __init__(self, sinks: int = 4):
        if sinks < 0:
            raise ValueError(f"streamingllm: sinks must be >= 0 (got {sinks})")
        self.sinks = sinks

    def scores(self, inp: ScoringInputs) -> torch.Tensor:
        pos = inp.positions.to(inp.keys.dtype)
        s = torch.where(inp.positions < self.sinks, torch.full_like(pos, float("inf")), pos)
        return s.masked_fill(~inp.valid, 0.0)
