"""NGC losses (docs/design.md section 1, "Losses (Dr. GRPO)"): group advantages, token loss, eviction loss.

Token choices and eviction choices are both actions of one policy, trained from one advantage per
rollout. Everything here is a plain function on tensors so the learner, tests and outside tools
share it.

**Global denominators.** Every loss is a *sum* of per-rollout contributions divided by a batch-wide
normaliser (number of sequences, or number of tokens for ``token_mean``). Passing the normaliser of
the full batch (``num_sequences=`` / ``num_tokens=``) to each micro-batch and each data-parallel rank
makes their losses add up exactly to the full-batch loss, so gradient accumulation plus a sum over
ranks gives exactly the full-batch gradient. ``seq_mean`` and the eviction loss only need the
global number of sequences; ``token_mean`` needs the global token count as well.

**On-policy vs clipped.** Without ``clip_eps`` the per-action term is ``logπ · A`` whose gradient is
the plain policy gradient ``A ∇logπ`` (one on-policy update per batch, docs/design.md section 1 default). With
``clip_eps`` it is the PPO surrogate ``min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A)`` with
``ρ = exp(logπ - logπ_old)`` (DAPO-style asymmetric when ``clip_eps_high`` is given); at ``ρ = 1``
both have the same gradient.

**Truncated importance sampling** (``tis``, docs/design.md section 5, "The objective for stale
rollouts"). The records' log-probs ``π_engine`` may come from older weights (bounded staleness) and
from another numerical path (the rollout engine). With ``tis`` the surrogate's reference becomes
``π_prox``, the learner's own log-probs at the start of the train step (detached), and each
per-action term is multiplied by a detached weight ``w = min(π_prox/π_engine, C)``, per action
(``"token"``) or one per rollout from the sum of its log-ratios (``"sequence"``); tokens and
eviction actions get their own weights. Without ``tis`` nothing changes (``π_old = π_engine``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rlmem.learner.clip_rule import raise_clip_problems

Aggregation = Literal["constant", "token_mean", "seq_mean"]
AGGREGATIONS = ("constant", "token_mean", "seq_mean")
TisMode = Literal["token", "sequence"]
TIS_MODES = ("token", "sequence")


@dataclass(frozen=True)
class LossConfig:
    """Loss options shared by every step. ``max_len`` is Dr. GRPO's constant normaliser (the
    maximum completion length, e.g. ``max_new_tokens``); required for ``aggregation="constant"``."""

    aggregation: Aggregation = "constant"
    max_len: int | None = None
    mem_coef: float = 1.0
    clip_eps: float | None = None
    clip_eps_high: float | None = None
    kl_coef: float = 0.0
    tis: TisMode | None = None
    tis_cap: float = 2.0

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"loss.aggregation: must be one of {AGGREGATIONS} (got {self.aggregation!r})")
        if self.aggregation == "constant" and (self.max_len is None or self.max_len < 1):
            raise ValueError(f"loss.max_len: aggregation 'constant' (Dr. GRPO) needs a positive max_len, "
                             f"the maximum completion length (got {self.max_len!r})")
        raise_clip_problems(self.clip_eps, self.clip_eps_high)   # the one clip rule (learner.config)
        if self.mem_coef < 0:
            raise ValueError(f"loss.mem_coef: must be >= 0 (got {self.mem_coef!r})")
        if self.kl_coef < 0:
            raise ValueError(f"loss.kl_coef: must be >= 0 (got {self.kl_coef!r})")
        check_tis(self.tis, self.tis_cap)


def check_tis(tis: str | None, tis_cap: float) -> None:
    """The truncated-IS settings (run-config keys ``algorithm.tis`` / ``algorithm.tis_cap``)."""
    if tis is not None and tis not in TIS_MODES:
        raise ValueError(f"algorithm.tis: must be token, sequence or null (off) (got {tis!r})")
    if isinstance(tis_cap, bool) or not (isinstance(tis_cap, (int, float)) and math.isfinite(tis_cap) and tis_cap > 0):
        raise ValueError(f"algorithm.tis_cap: must be a finite number > 0, the truncation C of the "
                         f"importance weight (got {tis_cap!r})")


def group_advantages(rewards: Tensor, group_size: int, *, scale_by_std: bool = False, eps: float = 1e-6) -> Tensor:
    """``A_i = r_i − mean_group(r)`` over consecutive groups of ``group_size`` rollouts.

    Dr. GRPO drops GRPO's std division (it biases towards too-easy/too-hard prompts);
    ``scale_by_std`` restores it with the unbiased group std (as TRL), ``A / (std + eps)``.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected a 1-D tensor, got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards: {rewards.numel()} rollouts are not a whole number of groups of "
                         f"group_size={group_size} (rollouts of one prompt must be consecutive)")
    r = rewards.view(-1, group_size).to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        adv = adv / (std + eps)
    return adv.reshape(-1)


def tis_weights(prox_logprobs: Tensor, engine_logprobs: Tensor, valid: Tensor, mode: TisMode,
                cap: float) -> tuple[Tensor, Tensor]:
    """Truncated importance weights ``w`` (detached, 0 where not ``valid``) and where they were truncated.

    ``"token"``: ``w = min(exp(log π_prox − log π_engine), C)`` per action. ``"sequence"``: one weight
    per rollout (dim 0), ``min(exp(Σ (log π_prox − log π_engine)), C)`` over all its valid actions
    (its tokens ``[B, T]``, or its eviction actions ``(round, layer)`` ``[B, R, L]``), given to each of
    them. ``min(exp(x), C) = exp(min(x, log C))`` never overflows.
    """
    if mode not in TIS_MODES:
        raise ValueError(f"algorithm.tis: must be token, sequence or null (off) (got {mode!r})")
    with torch.no_grad():
        d = torch.where(valid, prox_logprobs.detach() - engine_logprobs.to(prox_logprobs.dtype),
                        torch.zeros_like(prox_logprobs))
        if mode == "sequence":
            d = d.flatten(1).sum(dim=1).view(-1, *([1] * (d.dim() - 1))).expand_as(d)
        log_cap = math.log(cap)
        w = torch.exp(torch.clamp(d, max=log_cap))
        return torch.where(valid, w, torch.zeros_like(w)), valid & (d > log_cap)


def _surrogate(logprobs: Tensor, old_logprobs: Tensor | None, adv: Tensor, valid: Tensor,
               clip_eps: float | None, clip_eps_high: float | None, *, prox_logprobs: Tensor | None = None,
               tis: TisMode | None = None, tis_cap: float = 2.0) -> tuple[Tensor, dict[str, float]]:
    """Per-action objective (to maximise) and ratio statistics over ``valid`` actions.

    ``adv`` is broadcast to ``logprobs``. Invalid entries are zeroed (and their ``old`` values, which
    may be padding, never reach a ratio that could overflow). With ``tis`` the ratio is taken
    against ``prox_logprobs`` and the term is weighted by :func:`tis_weights` of ``prox`` vs ``old``
    (the engine's); the extra stats are ``tis_weight_mean/min/max``, ``tis_clip_frac`` (share of
    actions whose weight was truncated at ``C``) and ``engine_mismatch_kl`` (k3 estimate of
    ``KL(π_engine ‖ π_prox)``).
    """
    n = int(valid.sum())
    stats: dict[str, float] = {"count": float(n)}
    if tis is not None:
        if old_logprobs is None or prox_logprobs is None:
            raise ValueError("tis needs the engine's (old) log-probs and the proximal log-probs")
        w, truncated = tis_weights(prox_logprobs, old_logprobs, valid, tis, tis_cap)
        with torch.no_grad():
            wv = w[valid]
            # in float64: the k3 of nearly equal policies is a difference of nearly equal numbers
            lr = torch.where(valid, prox_logprobs.detach().double() - old_logprobs.double(),
                             torch.zeros_like(logprobs, dtype=torch.float64))
            stats["tis_weight_mean"] = float(wv.mean()) if n else 1.0
            stats["tis_weight_min"] = float(wv.min()) if n else 1.0
            stats["tis_weight_max"] = float(wv.max()) if n else 1.0
            stats["tis_clip_frac"] = float(truncated.sum()) / n if n else 0.0
            stats["engine_mismatch_kl"] = float((torch.expm1(lr) - lr)[valid].mean()) if n else 0.0
        term, st = _surrogate(logprobs, prox_logprobs.detach(), adv, valid, clip_eps, clip_eps_high)
        stats.update(st)
        return term * w.to(term.dtype), stats
    if old_logprobs is None:
        if clip_eps is not None:
            raise ValueError("clipping needs old_logprobs")
        return torch.where(valid, logprobs * adv, torch.zeros_like(logprobs)), stats
    log_ratio = torch.where(valid, logprobs - old_logprobs.to(logprobs.dtype), torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    with torch.no_grad():
        r = ratio[valid]
        stats["ratio_mean"] = float(r.mean()) if n else 1.0
        stats["ratio_min"] = float(r.min()) if n else 1.0
        stats["ratio_max"] = float(r.max()) if n else 1.0
        # k3 estimator of KL(old || new) (Schulman), for monitoring only.
        stats["approx_kl"] = float(((ratio - 1) - log_ratio)[valid].mean()) if n else 0.0
    if clip_eps is None:
        return torch.where(valid, logprobs * adv, torch.zeros_like(logprobs)), stats
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + hi) * adv
    term = torch.minimum(unclipped, clipped)
    with torch.no_grad():
        # The clipped branch is active (zero gradient) where it is strictly smaller.
        active = (clipped < unclipped) & valid
        stats["clip_frac"] = float(active.sum()) / n if n else 0.0
        stats["clip_frac_low"] = float((active & (ratio < 1.0 - clip_eps)).sum()) / n if n else 0.0
        stats["clip_frac_high"] = float((active & (ratio > 1.0 + hi)).sum()) / n if n else 0.0
    return torch.where(valid, term, torch.zeros_like(term)), stats


def _aggregate(term: Tensor, mask: Tensor, aggregation: Aggregation, max_len: int | None,
               num_sequences: int | None, num_tokens: int | None) -> Tensor:
    """Sum of per-token ``term [B, T]`` (zero where ``mask`` is False) under one of the
    aggregations: the token loss and the KL penalty share it, so both weigh tokens alike."""
    s = term.shape[0] if num_sequences is None else num_sequences
    if aggregation == "constant":
        if max_len is None or max_len < 1:
            raise ValueError("max_len: aggregation 'constant' needs the constant normaliser (max completion length)")
        return term.sum() / (s * max_len)
    if aggregation == "token_mean":
        n = int(mask.sum()) if num_tokens is None else num_tokens
        return term.sum() / max(n, 1)
    lengths = mask.sum(dim=1).clamp_min(1).to(term.dtype)
    return (term.sum(dim=1) / lengths).sum() / s


def token_loss(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    mask: Tensor,
    advantages: Tensor,
    *,
    aggregation: Aggregation = "constant",
    max_len: int | None = None,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
    clip_eps: float | None = None,
    clip_eps_high: float | None = None,
    prox_logprobs: Tensor | None = None,
    tis: TisMode | None = None,
    tis_cap: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """Token policy-gradient loss over ``logprobs [B, T]`` (completion tokens), ``mask [B, T]``.

    - ``constant`` (Dr. GRPO): ``−(1/S) Σ_i Σ_t term_{i,t} / max_len``; the normaliser is a constant,
      not the sequence length, so long and short rollouts get the same per-token weight.
    - ``token_mean``: ``−Σ_{i,t} term / N_tok`` (DAPO).
    - ``seq_mean``: ``−(1/S) Σ_i mean_t term_{i,t}`` (original GRPO; empty sequences add 0).

    ``S = num_sequences`` (default ``B``) and ``N_tok = num_tokens`` (default ``mask.sum()``) are the
    *global* denominators when this call is one micro-batch / rank of a larger batch (module docstring).
    ``tis`` weights each term by a truncated importance weight of ``prox_logprobs`` vs ``old_logprobs``
    (module docstring); ``"sequence"`` gives each rollout one weight over its tokens.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation: must be one of {AGGREGATIONS} (got {aggregation!r})")
    if logprobs.shape != mask.shape:
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match logprobs {tuple(logprobs.shape)}")
    mask = mask.bool()
    term, stats = _surrogate(logprobs, old_logprobs, advantages.to(logprobs.dtype)[:, None], mask,
                             clip_eps, clip_eps_high, prox_logprobs=prox_logprobs, tis=tis, tis_cap=tis_cap)
    loss = -_aggregate(term, mask, aggregation, max_len, num_sequences, num_tokens)
    stats["loss"] = float(loss.detach())
    return loss, stats


def kl_penalty(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    aggregation: Aggregation = "constant",
    max_len: int | None = None,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """KL(π_θ ‖ π_ref) on the sampled tokens, aggregated exactly as :func:`token_loss` aggregates.

    Per token the k3 estimator ``exp(r) − r − 1`` with ``r = log π_ref − log π_θ`` (Schulman;
    GRPO's and verl's ``low_var_kl``): non-negative, unbiased for the sequence KL under on-policy
    samples, and its gradient pulls ``log π_θ`` toward ``log π_ref``. Both log-probs are of the same
    surviving cache (the replay masks of the rollout), so the penalty anchors the token policy
    without saying anything about which entries to evict (docs/design.md section 1, Losses).
    """
    if logprobs.shape != mask.shape or ref_logprobs.shape != mask.shape:
        raise ValueError(f"kl_penalty: shapes {tuple(logprobs.shape)}, {tuple(ref_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} differ")
    mask = mask.bool()
    r = torch.where(mask, ref_logprobs.to(logprobs.dtype) - logprobs, torch.zeros_like(logprobs))
    term = torch.where(mask, torch.exp(r) - r - 1, torch.zeros_like(logprobs))
    kl = _aggregate(term, mask, aggregation, max_len, num_sequences, num_tokens)
    n = int(mask.sum())
    return kl, {"loss": float(kl.detach()), "kl_ref_mean": float(term.detach()[mask].mean()) if n else 0.0,
                "count": float(n)}


def eviction_loss(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    round_mask: Tensor,
    advantages: Tensor,
    *,
    num_sequences: int | None = None,
    clip_eps: float | None = None,
    clip_eps_high: float | None = None,
    prox_logprobs: Tensor | None = None,
    tis: TisMode | None = None,
    tis_cap: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """Eviction loss over Plackett-Luce log-probs ``[B, R, L]`` with ``round_mask [B, R]``.

    For each rollout and layer, the mean over that rollout's rounds of the term; averaged over the
    ``S = num_sequences`` rollouts (default ``B``); summed over layers (docs/design.md section 1). A rollout
    without rounds (it ended before its first round) contributes 0 but still counts in ``S``, so
    the eviction and token losses weigh each rollout by the same ``1/S``. ``tis``: as
    :func:`token_loss`, per eviction action ``(round, layer)``, or (``"sequence"``) one weight per
    rollout over all its eviction actions.
    """
    if logprobs.dim() != 3 or logprobs.shape[:2] != round_mask.shape:
        raise ValueError(f"round_mask: shape {tuple(round_mask.shape)} does not match eviction logprobs "
                         f"{tuple(logprobs.shape)} ([B, R, L] vs [B, R])")
    valid = round_mask.bool()[:, :, None].expand_as(logprobs)
    term, stats = _surrogate(logprobs, old_logprobs, advantages.to(logprobs.dtype)[:, None, None], valid,
                             clip_eps, clip_eps_high, prox_logprobs=prox_logprobs, tis=tis, tis_cap=tis_cap)
    rounds = round_mask.sum(dim=1).clamp_min(1).to(term.dtype)            # [B]
    per_layer = term.sum(dim=1) / rounds[:, None]                          # [B, L]
    s = logprobs.shape[0] if num_sequences is None else num_sequences
    loss = -per_layer.sum() / s
    stats["loss"] = float(loss.detach())
    return loss, stats


def ngc_loss(
    token_logprobs: Tensor,
    old_token_logprobs: Tensor | None,
    token_mask: Tensor,
    eviction_logprobs: Tensor | None,
    old_eviction_logprobs: Tensor | None,
    round_mask: Tensor | None,
    advantages: Tensor,
    cfg: LossConfig,
    *,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
    ref_token_logprobs: Tensor | None = None,
    prox_token_logprobs: Tensor | None = None,
    prox_eviction_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Total NGC loss = token loss + ``mem_coef`` × eviction loss + ``kl_coef`` × KL to the reference.

    ``eviction_logprobs=None`` (or ``R = 0``, or ``mem_coef = 0``) leaves only the token loss. The KL
    term (:func:`kl_penalty`) needs ``ref_token_logprobs`` when ``kl_coef > 0`` (NGC's default is 0).
    Stats keys: ``loss``, ``loss/token``, ``loss/eviction``, and ``token/…`` / ``eviction/…`` ratio and
    clip statistics (``count`` is the number of actions they are over). With ``cfg.tis`` the
    ``prox_…`` log-probs (the learner's own at the start of the step) are needed, and the stats add
    ``token/tis_…`` / ``eviction/tis_…`` and ``…/engine_mismatch_kl``.
    """
    tis = {}
    if cfg.tis is not None:
        if prox_token_logprobs is None or (prox_eviction_logprobs is None and eviction_logprobs is not None):
            raise ValueError("ngc_loss: algorithm.tis needs the proximal (start-of-step) log-probs")
        tis = dict(tis=cfg.tis, tis_cap=cfg.tis_cap)
    tl, ts = token_loss(token_logprobs, old_token_logprobs, token_mask, advantages,
                        aggregation=cfg.aggregation, max_len=cfg.max_len, num_sequences=num_sequences,
                        num_tokens=num_tokens, clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                        **(dict(tis, prox_logprobs=prox_token_logprobs) if tis else {}))
    stats = {f"token/{k}": v for k, v in ts.items() if k != "loss"}
    stats["loss/token"] = ts["loss"]
    total = tl
    if eviction_logprobs is not None and eviction_logprobs.numel() > 0 and cfg.mem_coef > 0:
        el, es = eviction_loss(eviction_logprobs, old_eviction_logprobs, round_mask, advantages,
                               num_sequences=num_sequences, clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                               **(dict(tis, prox_logprobs=prox_eviction_logprobs) if tis else {}))
        total = tl + cfg.mem_coef * el
        stats.update({f"eviction/{k}": v for k, v in es.items() if k != "loss"})
        stats["loss/eviction"] = es["loss"]
    else:
        stats["loss/eviction"] = 0.0
        stats["eviction/count"] = 0.0
    if cfg.kl_coef > 0:
        if ref_token_logprobs is None:
            raise ValueError("ngc_loss: kl_coef > 0 needs the reference model's token log-probs")
        kl, ks = kl_penalty(token_logprobs, ref_token_logprobs, token_mask, aggregation=cfg.aggregation,
                            max_len=cfg.max_len, num_sequences=num_sequences, num_tokens=num_tokens)
        total = total + cfg.kl_coef * kl
        stats["loss/kl"] = ks["loss"]
        stats["token/kl_ref_mean"] = ks["kl_ref_mean"]
    stats["loss"] = float(total.detach())
    return total, stats
