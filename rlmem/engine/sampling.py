"""Token sampling for the rollout engines, and the one definition of the sampling settings.

The recorded log-prob is always under ``softmax(logits / temperature)`` *without* top-k/top-p
truncation, because that is the distribution the learner replays (docs/design.md section 1; the
truncation is a known, documented mismatch). :func:`token_log_softmax` is that distribution, used
by every engine and by the learner's replay.

:class:`SamplingParams` is to sampling what :class:`~rlmem.eviction.policy.EvictionConfig` is to
eviction: its fields (:data:`SAMPLING_FIELDS`), their help and their validation are the only ones.
The run config's ``rollout`` and ``eval`` sections and the CLI's sampling flags
(``rlmem.commands.common.add_sampling_args``) are derived from them; where a caller's default
differs on purpose it says so where it sets it (training: the paper's T = 0.9 and 1024 tokens, in
``rlmem/run/config/schema.py``; evaluation: T = 0.6, top-p 0.95, in
``rlmem/evaluation/pipeline.py::EVAL_SAMPLING_DEFAULTS``). The defaults here are the engine's
neutral ones: the model's own distribution (T = 1, no truncation), 256 new tokens.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any

import torch


def _field(default, help: str, **kw):
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class SamplingParams:
    temperature: float = _field(1.0, "token temperature T > 0: tokens are drawn from softmax(logits/T), "
                                     "and their log-probs recorded under it")
    top_k: int = _field(0, "sample among the k most likely tokens only (0: off); recorded log-probs stay untruncated")
    top_p: float = _field(1.0, "sample from the smallest set of tokens holding this much probability (1.0: off); "
                               "recorded log-probs stay untruncated")
    max_new_tokens: int = _field(256, "most tokens generated per completion")
    stop: list[str] = field(default_factory=list, metadata={"help": "stop string, kept in the completion (repeatable)"})
    seed: int | None = _field(None, "sampling seed of this call; None: continue the engine's generator")

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"sampling.{name}: {why} (got {getattr(self, name)!r})")

        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not (t > 0 and math.isfinite(t)):
            raise bad("temperature", "must be a finite number > 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0: off)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, numbers.Real) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1] (1: off)")
        mnt = self.max_new_tokens
        if isinstance(mnt, bool) or not isinstance(mnt, numbers.Integral) or mnt < 1:
            raise bad("max_new_tokens", "must be an integer >= 1")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings")

    @classmethod
    def from_fields(cls, values: dict[str, Any], seed: int | None = None, *, allow_greedy: bool = False
                    ) -> "SamplingParams":
        """Params from the user-set :data:`SAMPLING_FIELDS` in ``values`` (missing ones: the defaults).

        With ``allow_greedy`` (evaluation), ``temperature`` 0 means greedy decoding, vLLM's
        convention: sampled as top-1 at T = 1, so the records' log-probs are those of the model's
        own distribution. Training never allows it (a group of identical greedy rollouts has no
        advantage to learn from).
        """
        kw = {k: values[k] for k in SAMPLING_FIELDS if k in values}
        if "stop" in kw:
            kw["stop"] = list(kw["stop"])
        if allow_greedy and not isinstance(kw.get("temperature"), bool) and kw.get("temperature") == 0:
            kw.update(temperature=1.0, top_k=1, top_p=1.0)
        elif allow_greedy and isinstance(kw.get("temperature"), numbers.Real) and kw["temperature"] < 0:
            raise ValueError(f"sampling.temperature: must be > 0, or 0 for greedy decoding (got {kw['temperature']!r})")
        return cls(**kw, seed=seed)


# The fields a user sets (the seed is derived per call); the CLI and the run config derive from these.
SAMPLING_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SamplingParams) if f.name != "seed")


def sampling_field_help(name: str) -> str:
    """The help text of a :class:`SamplingParams` field (CLI help, config descriptions)."""
    return next(f.metadata["help"] for f in fields(SamplingParams) if f.name == name)


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
