"""The NGC eviction policy: schedule, blocks, selection, sampling and Plackett-Luce log-probability.

This is the only implementation of docs/design.md section 1 in rlmem (per-key scoring lives in
:mod:`rlmem.eviction.scorers`, NGC's in ``scorers/ngc.py``). The torch engine calls it on its
physically compacted caches, the learner's replay calls it on the full sequence's Q/K (on the
autograd graph), and any other engine must call it too: never copy it.

Shapes use ``B`` for independent scoring problems (sequences in an engine batch, or rounds of one
sequence in the replay), ``C`` for key slots, ``N`` for blocks. A boolean ``valid[B, C]`` marks the
alive keys; alive keys are ordered by position (slot order must equal position order).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch

from rlmem.eviction.scorers import Scorer, ScoringInputs, get_scorer, scorer_names
from rlmem.eviction.scorers.base import ScorerArgs, check_scorer_args

ScoreTransform = Literal["log", "linear"]


def _field(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EvictionConfig:
    """NGC hyper-parameters (docs/design.md section 1); ``eps == 0`` means a full cache (no rounds).

    The one definition of the eviction settings: the CLI flags (``add_eviction_args``), the run
    config's ``eviction`` section and the rollout record's ``eviction`` fields are all derived from
    these fields and defaults. Defaults are the paper's settings (b=32, w=5, δ=256 for Countdown).
    """

    delta: int = _field(256, "cadence δ: tokens between eviction rounds")
    eps: float = _field(0.5, "eviction rate ε in (0, 1]; 0 = full cache (no eviction)")
    block_size: int = _field(32, "block size b (tokens per block)")
    window: int = _field(5, "scoring window w (most recent queries)")
    protect_recent: int = _field(1, "newest blocks always kept, outside the action (0 = paper-literal)")
    score_transform: ScoreTransform = _field("log", "block logits: log(s)/τ or s/τ (learned scorer only)")
    tau: float = _field(1.0, "block-logit temperature τ (learned scorer only)")
    scorer: str = _field("ngc", "who scores keys: 'ngc' (learned) or a heuristic baseline")
    scorer_args: dict[str, Any] = _field(ScorerArgs(), "the scorer's own settings, KEY=VALUE (e.g. sinks=8 for "
                                         "streamingllm, kernel_size=7 for snapkv, mix_lambda=0.2 for rkv)")

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
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not (float(self.tau) > 0 and math.isfinite(self.tau)):
            raise bad("tau", "must be a finite number > 0")
        if self.scorer not in scorer_names():
            raise bad("scorer", f"must be one of {scorer_names()}")
        object.__setattr__(self, "scorer_args", check_scorer_args(self.scorer, self.scorer_args))
        if self.delta < self.window:
            raise ValueError(f"eviction.delta ({self.delta}) must be >= eviction.window ({self.window})")
        if self.delta < self.block_size:
            raise ValueError(f"eviction.delta ({self.delta}) must be >= eviction.block_size ({self.block_size})")

    @property
    def enabled(self) -> bool:
        return self.eps > 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scorer_args"] = dict(self.scorer_args)
        return d

    def scorer_settings(self) -> dict[str, Any]:
        """Every setting of the scorer, defaults included (what a record states made it)."""
        return {**get_scorer(self.scorer).settings(), **self.scorer_args}

    def make_scorer(self) -> Scorer:
        """The scorer of these settings (what every engine and the replay score with)."""
        return get_scorer(self.scorer, **self.scorer_args)


# The eviction fields, in order; the record, the CLI and the config schema derive from this.
EVICTION_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(EvictionConfig))


def eviction_field_help(name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(EvictionConfig) if f.name == name)


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
# Block logits: the one chain from per-key scores to the action's logits


def block_means(scores: torch.Tensor, valid: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean score of each block ``[B, N_max]``, which blocks exist ``[B, N_max]``, block counts ``[B]``.

    Alive keys are ranked by slot; rank // b is the block (oldest first, the newest may be short).
    """
    bsz, c = scores.shape
    b = block_size
    rank = torch.cumsum(valid.long(), dim=1) - 1
    n_blocks = (valid.sum(dim=1) + b - 1) // b
    n_max = max(int(n_blocks.max().item()) if bsz else 0, 1)
    block_id = torch.where(valid, rank // b, torch.full_like(rank, n_max))  # invalid -> overflow bucket
    vals = scores.masked_fill(~valid, 0.0)
    sums = torch.zeros(bsz, n_max + 1, dtype=scores.dtype, device=scores.device).scatter_add(1, block_id, vals)
    sizes = torch.zeros(bsz, n_max + 1, dtype=scores.dtype, device=scores.device).scatter_add(
        1, block_id, valid.to(scores.dtype))
    sums, sizes = sums[:, :n_max], sizes[:, :n_max]
    return sums / sizes.clamp_min(1), sizes > 0, n_blocks


def selection_logits(scores: torch.Tensor, valid: torch.Tensor, cfgs: list[EvictionConfig],
                     learned: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the eligible blocks ``z [B, N_max]`` (``-inf`` elsewhere) and block counts ``[B]``.

    Block score ``s_j`` = mean of the per-key scores over block j (docs/design.md section 1, Blocks).
    For the learned scorer ``z = log(s)/τ`` or ``s/τ`` (the action's logits); a heuristic's block
    scores are used as they are (it is only ranked). The newest ``protect_recent`` blocks are masked:
    they are always kept and are not part of the action. Both the engines (through :func:`decide`)
    and the learner's replay compute eviction logits with this one function.
    """
    cfg = cfgs[0]
    s, exists, n_blocks = block_means(scores, valid, cfg.block_size)
    if not learned:
        z = s
    elif cfg.score_transform == "log":
        # Clamp so a block whose attention underflowed stays finite (it is then simply very unlikely).
        z = torch.log(s.clamp_min(torch.finfo(s.dtype).tiny)) / cfg.tau
    else:
        z = s / cfg.tau
    protect = torch.tensor([c.protect_recent for c in cfgs], device=z.device)
    idx = torch.arange(z.shape[1], device=z.device)
    eligible = exists & (idx[None, :] < (n_blocks - protect).clamp_min(0)[:, None])
    return z.masked_fill(~eligible, float("-inf")), n_blocks


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
    Computed as a masked logsumexp over an ``M×N`` matrix per row (docs/design.md section 1,
    Eviction log-probability).
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
    logprob: float            # Plackett-Luce log-prob (0.0 for a heuristic scorer: not an action)
    keep_slots: list[int]     # surviving alive-key indices, increasing


def check_batch_configs(cfgs: list[EvictionConfig | None]) -> None:
    """Rows of one batch may differ in ε, δ and protect_recent (curriculum, interoception, full-cache
    rows); block size, window, transform, τ and scorer are per batch."""
    shared = {(c.block_size, c.window, c.score_transform, c.tau, c.scorer, c.scorer_args)
              for c in cfgs if c is not None and c.enabled}
    if len(shared) > 1:
        raise ValueError("prompts in one batch may differ in eps/delta/protect_recent only; got "
                         f"block_size/window/score_transform/tau/scorer/scorer_args combinations "
                         f"{sorted(shared, key=repr)}")


def decide(scorer: Scorer, inputs: ScoringInputs, cfgs: list[EvictionConfig],
           generator: torch.Generator | None = None, greedy: bool = False) -> list[RoundDecision]:
    """Score, select and log-probability for ``B`` independent problems (one per row of ``inputs``).

    The learned scorer samples with Gumbel-top-k (plain top-k when ``greedy``, i.e. at evaluation)
    and records the Plackett-Luce log-prob; a heuristic scorer always takes its top-k and records 0.
    """
    scores = scorer.scores(inputs)
    z, n_blocks = selection_logits(scores, inputs.valid, cfgs, learned=scorer.learned)
    decisions, orders = [], []
    for i, cfg in enumerate(cfgs):
        n = int(n_blocks[i])
        eligible = max(0, n - cfg.protect_recent)
        m = keep_count(n, cfg.eps, cfg.protect_recent) - min(cfg.protect_recent, n)
        kept = sample_blocks(z[i, :eligible], m, generator, greedy or not scorer.learned)
        orders.append(kept)
        decisions.append(RoundDecision(n, kept, 0.0, kept_key_slots(int(inputs.valid[i].sum()), kept, cfg)))
    if scorer.learned:
        lp = plackett_luce_logprob(z, pad_orders(orders, z.device))
        for d, v in zip(decisions, lp.tolist()):
            d.logprob = v
    return decisions


def pad_orders(orders: list[list[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    m = max((len(o) for o in orders), default=0)
    out = torch.full((len(orders), m), -1, dtype=torch.long)
    for i, o in enumerate(orders):
        out[i, : len(o)] = torch.tensor(o, dtype=torch.long)
    return out.to(device)
