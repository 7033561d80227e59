"""Token sampling for the rollout engines.

The recorded log-prob is always under ``softmax(logits / temperature)`` *without* top-k/top-p
truncation, because that is the distribution the learner replays (DESIGN.md section 1; the
truncation is a known, documented mismatch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0                 # 0: off
    top_p: float = 1.0             # 1.0: off
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)   # stop strings (the completion keeps them)
    seed: int | None = None        # None: continue the engine's generator

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"sampling.temperature must be > 0 (got {self.temperature})")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1] (got {self.top_p})")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1 (got {self.max_new_tokens})")


def sample_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from ``logits [B, V]``; return ``(tokens [B], logprobs [B])``."""
    scaled = logits.float() / params.temperature if logits.dtype != torch.float64 else logits / params.temperature
    logprobs = torch.log_softmax(scaled, dim=-1)
    filtered = scaled
    if params.top_k and params.top_k < filtered.shape[-1]:
        kth = torch.topk(filtered, params.top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(filtered, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        filtered = filtered.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(filtered.double(), dim=-1)
    tokens = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
