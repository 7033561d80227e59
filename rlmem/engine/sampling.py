"""Token sampling for the rollout engines.

The recorded log-prob is always under ``softmax(logits / temperature)`` *without* top-k/top-p
truncation, because that is the distribution the learner replays (docs/design.md section 1; the
truncation is a known, documented mismatch). :func:`token_log_softmax` is that distribution, used
by every engine and by the learner's replay.
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


def token_log_softmax(logits: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """``log_softmax(logits / T)`` in at least fp32: logits are upcast *before* dividing by an fp32
    temperature, so a bf16 model does not round T (0.9 would become 0.8984375 in bf16).

    logits ``[..., V]``; temperature a float or a tensor broadcastable to ``logits.shape[:-1]``.
    """
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    t = torch.as_tensor(temperature, dtype=dt, device=logits.device)
    while t.dim() < logits.dim():
        t = t[..., None]
    return torch.log_softmax(logits.to(dt) / t, dim=-1)


def sample_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from ``logits [B, V]``; return ``(tokens [B], logprobs [B])``."""
    logprobs = token_log_softmax(logits, params.temperature)
    dt = logprobs.dtype
    filtered = logits.to(dt) / torch.as_tensor(params.temperature, dtype=dt)
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
