"""The NGC eviction policy: schedule, scoring, blocks, sampling and Plackett-Luce log-probability.

This is the only implementation of DESIGN.md section 1 in rlmem. The torch engine calls it on its
physically compacted caches, the learner's replay calls it on the full sequence's Q/K (on the
autograd graph), and any other engine must call it too: never copy it.

Shapes use ``B`` for independent scoring problems (sequences in an engine batch, or rounds of one
sequence in the replay), ``C`` for key slots, ``N`` for blocks. A boolean ``valid[B, C]`` marks the
alive keys; alive keys are ordered by position (slot order must equal position order).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

ScoreTransform = Literal["log", "linear"]


@dataclass(frozen=True)
class EvictionConfig:
    """NGC hyper-parameters (DESIGN.md section 1). ``eps == 0`` means a full cache (no rounds)."""

    delta: int = 64              # cadence δ: tokens between rounds
    eps: float = 0.5             # eviction rate ε in (0, 1]; 0 disables eviction
    block_size: int = 16         # b
    window: int = 8              # w: scoring queries
    protect_recent: int = 1      # newest blocks always kept, outside the action
    score_transform: ScoreTransform = "log"
    tau: float = 1.0             # logit temperature τ

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"eviction.{field}: {why} (got {getattr(self, field)!r})")

        for name in ("delta", "block_size", "window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "must be a positive integer")
        if isinstance(self.protect_recent, bool) or not isinstance(self.protect_recent, int) or self.protect_recent < 0:
            raise bad("protect_recent", "must be an integer >= 0")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not (0.0 <= float(self.eps) <= 1.0):
            raise bad("eps", "must be in (0, 1], or 0 for a full cache")
        if self.score_transform not in ("log", "linear"):
            raise bad("score_transform", "must be 'log' or 'linear'")
        if not isinstance(self.tau, (int, float)) or not (float(self.tau) > 0 and math.isfinite(self.tau)):
            raise bad("tau", "must be a finite number > 0")
        if self.delta < self.window:
            raise ValueError(f"eviction.delta ({self.delta}) must be >= eviction.window ({self.window})")
        if self.delta < self.block_size:
            raise ValueError(f"eviction.delta ({self.delta}) must be >= eviction.block_size ({self.block_size})")

    @property
    def enabled(self) -> bool:
        return self.eps > 0

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Schedule (grow-then-evict)


def first_round(prompt_len: int, cfg: EvictionConfig) -> int:
    """``t_1 = max(δ, p)``: the cache (prompt included) holds δ tokens, or right after prefill."""
    return max(cfg.delta, prompt_len)


def is_round(t: int, prompt_len: int, cfg: EvictionConfig) -> bool:
    """Whether a round fires before ``x_t`` is fed (the caller knows ``x_t`` will be fed)."""
    if not cfg.enabled:
        return False
    t1 = first_round(prompt_len, cfg)
    return t >= t1 and (t - t1) % cfg.delta == 0


def round_times(prompt_len: int, seq_len: int, cfg: EvictionConfig) -> list[int]:
    """Round times of a sequence of ``seq_len`` tokens: ``t_r < seq_len - 1`` (x_{t_r} is fed)."""
    if not cfg.enabled:
        return []
    return list(range(first_round(prompt_len, cfg), seq_len - 1, cfg.delta))


# ----------------------------------------------------------------------------------------------
# Blocks and keep counts


def num_blocks(num_alive: int, block_size: int) -> int:
    return -(-num_alive // block_size)


def keep_count(n_blocks: int, eps: float, protect_recent: int) -> int:
    """``K = clamp(round_half_up((1-ε)·N), protect_recent, N)``.

    A tiny slack absorbs binary rounding ((1-0.9)*5 is 0.4999999999999999 in floats, meant 0.5).
    """
    k = math.floor((1.0 - eps) * n_blocks + 0.5 + 1e-9)
    return max(min(protect_recent, n_blocks), min(k, n_blocks))


def kept_key_slots(n_alive: int, kept_eligible: list[int], cfg: EvictionConfig) -> list[int]:
    """Indices (into the position-ordered alive keys) of the keys that survive a round."""
    n = num_blocks(n_alive, cfg.block_size)
    kept = set(kept_eligible) | set(range(max(0, n - cfg.protect_recent), n))
    b = cfg.block_size
    return [i for j in sorted(kept) for i in range(j * b, min((j + 1) * b, n_alive))]


# ----------------------------------------------------------------------------------------------
# Scoring


def key_scores(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """ψ: attention mass of the window queries on each alive key (DESIGN.md section 1, Scoring).

    queries ``[B, Hq, w, d]`` (post-RoPE), keys ``[B, Hkv, C, d]`` (post-RoPE), valid ``[B, C]``.
    Softmax over the alive keys only, no causal restriction inside the window; averaged over all
    query heads (each uses its KV group's keys) and the ``w`` queries. Returns ``[B, C]``, 0 where
    not valid.
    """
    bsz, hq, w, d = queries.shape
    hkv = keys.shape[1]
    group = hq // hkv
    q = queries.reshape(bsz, hkv, group * w, d)
    logits = torch.matmul(q, keys.transpose(-1, -2)) * scaling          # [B, Hkv, group*w, C]
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs.mean(dim=(1, 2)).masked_fill(~valid, 0.0)


def block_logits(psi: torch.Tensor, valid: torch.Tensor, cfg: EvictionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Block logits ``z [B, N_max]`` (``-inf`` past each row's last block) and block counts ``[B]``.

    Alive keys are ranked by slot; rank // b is the block (oldest first, the newest may be short).
    ``s_j`` is the mean of ψ over block j; ``z = log(s)/τ`` or ``s/τ``.
    """
    bsz, c = psi.shape
    b = cfg.block_size
    rank = torch.cumsum(valid.long(), dim=1) - 1
    counts_alive = valid.sum(dim=1)
    n_blocks = (counts_alive + b - 1) // b
    n_max = max(int(n_blocks.max().item()) if bsz else 0, 1)
    block_id = torch.where(valid, rank // b, torch.full_like(rank, n_max))  # invalid -> overflow bucket
    sums = torch.zeros(bsz, n_max + 1, dtype=psi.dtype, device=psi.device).scatter_add(1, block_id, psi)
    sizes = torch.zeros(bsz, n_max + 1, dtype=psi.dtype, device=psi.device).scatter_add(
        1, block_id, valid.to(psi.dtype))
    sums, sizes = sums[:, :n_max], sizes[:, :n_max]
    exists = sizes > 0
    s = sums / sizes.clamp_min(1)
    if cfg.score_transform == "log":
        # Clamp so a block whose attention underflowed stays finite (it is then simply very unlikely).
        z = torch.log(s.clamp_min(torch.finfo(s.dtype).tiny)) / cfg.tau
    else:
        z = s / cfg.tau
    return z.masked_fill(~exists, float("-inf")), n_blocks


# ----------------------------------------------------------------------------------------------
# Sampling and log-probability


def gumbel_like(z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(z.shape, generator=generator, dtype=torch.float64, device="cpu")
    tiny = torch.finfo(torch.float64).tiny
    return (-torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-16)))).to(device=z.device, dtype=z.dtype)


def sample_blocks(z: torch.Tensor, m: int, generator: torch.Generator | None = None, greedy: bool = False) -> list[int]:
    """Gumbel-top-k (or plain top-k when ``greedy``): ``m`` block indices in descending perturbed order.

    ``z`` is the 1-D logits of the eligible blocks. Gumbel-top-k draws an ordered sample without
    replacement from the Plackett-Luce distribution with weights ``exp(z)``.
    """
    if m <= 0:
        return []
    perturbed = z if greedy else z + gumbel_like(z, generator)
    return torch.topk(perturbed, m, sorted=True).indices.tolist()


def plackett_luce_logprob(z: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``log p(σ) = Σ_j [z_{σ_j} − logsumexp_{i ∉ σ_<j} z_i]`` for each row.

    z ``[B, N]`` (``-inf`` for blocks outside the action), order ``[B, M]`` with ``-1`` padding.
    Computed as a masked logsumexp over an ``M×N`` matrix per row (DESIGN.md section 1).
    """
    bsz, n = z.shape
    m = order.shape[1]
    if m == 0:
        return z.new_zeros(bsz)
    picked = order >= 0
    safe = order.clamp_min(0)
    onehot = torch.nn.functional.one_hot(safe, n).to(torch.bool) & picked[..., None]   # [B, M, N]
    taken_before = (torch.cumsum(onehot.long(), dim=1) - onehot.long()) > 0            # σ_<j
    avail = ~taken_before & torch.isfinite(z)[:, None, :]
    lse = torch.logsumexp(z[:, None, :].expand(bsz, m, n).masked_fill(~avail, float("-inf")), dim=-1)
    chosen = torch.gather(z, 1, safe)
    terms = torch.where(picked, chosen - lse, torch.zeros_like(lse))
    return terms.sum(dim=1)


@dataclass
class RoundDecision:
    """One layer's decision for one sequence at one round."""

    num_blocks: int
    kept: list[int]           # kept eligible blocks, in sampled order
    logprob: float
    keep_slots: list[int]     # surviving alive-key indices, increasing


def decide(
    queries: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    cfgs: list[EvictionConfig],
    generator: torch.Generator | None = None,
    greedy: bool = False,
) -> list[RoundDecision]:
    """Score, sample and log-probability for ``B`` independent problems (one per row).

    ``cfgs[i]`` is row i's config (rows may differ in ε under a curriculum or interoception; block
    size, window, transform and τ must agree within a batch).
    """
    cfg0 = cfgs[0]
    psi = key_scores(queries, keys, valid, scaling)
    z, n_blocks = block_logits(psi, valid, cfg0)
    decisions, orders = [], []
    for i, cfg in enumerate(cfgs):
        n = int(n_blocks[i])
        eligible = max(0, n - cfg.protect_recent)
        m = keep_count(n, cfg.eps, cfg.protect_recent) - min(cfg.protect_recent, n)
        kept = sample_blocks(z[i, :eligible], m, generator, greedy)
        orders.append(kept)
        decisions.append(RoundDecision(n, kept, 0.0, kept_key_slots(int(valid[i].sum()), kept, cfg)))
    lp = plackett_luce_logprob(eligible_logits(z, n_blocks, cfgs), pad_orders(orders, z.device))
    for d, v in zip(decisions, lp.tolist()):
        d.logprob = v
    return decisions


def eligible_logits(z: torch.Tensor, n_blocks: torch.Tensor, cfgs: list[EvictionConfig]) -> torch.Tensor:
    """Mask the protected newest blocks to ``-inf``: they are kept but are not part of the action."""
    protect = torch.tensor([c.protect_recent for c in cfgs], device=z.device)
    idx = torch.arange(z.shape[1], device=z.device)
    return z.masked_fill(idx[None, :] >= (n_blocks - protect).clamp_min(0)[:, None], float("-inf"))


def pad_orders(orders: list[list[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    m = max((len(o) for o in orders), default=0)
    out = torch.full((len(orders), m), -1, dtype=torch.long)
    for i, o in enumerate(orders):
        out[i, : len(o)] = torch.tensor(o, dtype=torch.long)
    return out.to(device)
