"""The learner's settings: the one definition of the optimizer, loss and learner-rank fields.

Torch-free on purpose: the run-config schema (:mod:`rlmem.run.config.schema`) derives its
``optimizer`` and ``learner`` sections and the loss fields of ``algorithm`` from these dataclass
fields (names, types, defaults), so the config check can build a :class:`LearnerConfig` and reuse
its rules long before Ray or DeepSpeed are imported. Error messages name the run-config key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from rlmem.dtypes import LEARNER_DTYPES, canonical
from rlmem.learner.clip_rule import raise_clip_problems

# Which run-config section each field lives in (the rest are derived by the driver).
OPTIMIZER_FIELDS = ("lr", "betas", "eps", "weight_decay", "grad_clip", "schedule", "warmup_steps", "min_lr_ratio")
LEARNER_FIELDS = ("zero_stage", "micro_batch_size", "gradient_checkpointing", "dtype", "offload_optimizer",
                  "replay_kernel", "replay_mask", "kl_ref_device")
ALGORITHM_FIELDS = ("aggregation", "mem_coef", "kl_coef", "clip_eps", "clip_eps_high", "mini_batches", "ppo_epochs",
                    "tis", "tis_cap")


@dataclass
class LearnerConfig:
    """Everything one learner rank needs (see :class:`rlmem.learner.learner.Learner`)."""

    model_path: str
    dtype: Literal[LEARNER_DTYPES] = "float32"   # rlmem.dtypes, the one table
    zero_stage: Literal[0, 2, 3] = 0
    micro_batch_size: int = 1                 # sequences per forward/backward
    # optimizer (AdamW, the paper's settings)
    lr: float = 5e-6
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-15
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    schedule: Literal["constant", "warmup", "warmup_cosine"] = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None            # optimizer steps; needed by warmup_cosine
    min_lr_ratio: float = 0.0
    gradient_checkpointing: bool = False
    offload_optimizer: bool = False           # ZeRO offload of optimizer states to CPU (untested here)
    # loss (rlmem.learner.loss.LossConfig)
    aggregation: Literal["constant", "token_mean", "seq_mean"] = "constant"
    max_len: int | None = None                # Dr. GRPO constant: the max completion length
    mem_coef: float = 1.0
    # KL(π_θ ‖ π_ref) on the sampled tokens, π_ref = the weights at model_path (rlmem.learner.loss.kl_penalty)
    kl_coef: float = 0.0
    # Where π_ref lives (with kl_coef > 0): "auto", the rank's device from its device plan
    # (rlmem.devices), in the learner's dtype; "cpu", offloaded on purpose (saves a model's worth of
    # GPU memory, costs a CPU replay of every micro-batch).
    kl_ref_device: Literal["auto", "cpu"] = field(default="auto", metadata={"help": (
        "where the KL reference model lives when algorithm.kl_coef > 0: auto = this learner rank's device "
        "(its device plan, the learner's dtype); cpu = offloaded to the CPU (frees GPU memory, replays on the CPU)")})
    clip_eps: float | None = None
    clip_eps_high: float | None = None
    mini_batches: int = 1                     # optimizer steps per train_step (per epoch)
    ppo_epochs: int = 1
    # Truncated importance sampling (docs/design.md section 5, "The objective for stale rollouts").
    tis: Literal["token", "sequence"] | None = field(default=None, metadata={"help": (
        "truncated importance sampling against the rollout engine's log-probs: null = off (the clipped "
        "surrogate with the records' log-probs as pi_old); token = one weight min(pi_prox/pi_engine, tis_cap) "
        "per token / eviction action; sequence = one weight per rollout (its tokens; its eviction actions)")})
    tis_cap: float = field(default=2.0, metadata={"help": "C, the truncation of the importance weight (> 0)"})
    replay_kernel: Literal["sdpa", "flex"] = "sdpa"
    replay_mask: Literal["evicted", "causal"] = "evicted"   # causal: plain causal mask, the paper's ablation
    compute_eviction: bool = True             # False: token loss only (eviction actions not trained)
    seed: int = 0
    ds_config_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dtype = canonical(self.dtype, choices=LEARNER_DTYPES, what="learner.dtype")
        if self.zero_stage not in (0, 2, 3):
            raise ValueError(f"learner.zero_stage: must be 0, 2 or 3 (got {self.zero_stage!r})")
        if self.dtype == "float64" and self.zero_stage != 0:
            # ZeRO keeps fp32 master partitions: fp64 weights would silently be updated in fp32.
            raise ValueError("learner.dtype: float64 needs learner.zero_stage 0 (ZeRO masters are fp32)")
        if self.micro_batch_size < 1:
            raise ValueError(f"learner.micro_batch_size: must be >= 1 (got {self.micro_batch_size})")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"optimizer.lr: must be a finite number > 0 (got {self.lr!r})")
        if self.mini_batches < 1 or self.ppo_epochs < 1:
            raise ValueError("algorithm.mini_batches and algorithm.ppo_epochs must be >= 1")
        raise_clip_problems(self.clip_eps, self.clip_eps_high, mini_batches=self.mini_batches,
                            ppo_epochs=self.ppo_epochs)
        if self.schedule not in ("constant", "warmup", "warmup_cosine"):
            raise ValueError(f"optimizer.schedule: must be constant, warmup or warmup_cosine (got {self.schedule!r})")
        if self.schedule == "warmup_cosine" and not self.total_steps:
            raise ValueError("optimizer.schedule: warmup_cosine needs the total number of optimizer steps")
        if self.replay_kernel not in ("sdpa", "flex"):
            raise ValueError(f"learner.replay_kernel: must be sdpa or flex (got {self.replay_kernel!r})")
        if self.kl_ref_device not in ("auto", "cpu"):
            raise ValueError(f"learner.kl_ref_device: must be auto or cpu (got {self.kl_ref_device!r})")
        if self.replay_mask not in ("evicted", "causal"):
            raise ValueError(f"learner.replay_mask: must be evicted or causal (got {self.replay_mask!r})")
        self.loss_config()  # validates aggregation / max_len / clip values

    def loss_config(self):
        """The :class:`rlmem.learner.loss.LossConfig` of these settings (imported lazily: it needs torch)."""
        from rlmem.learner.loss import LossConfig

        return LossConfig(aggregation=self.aggregation, max_len=self.max_len, mem_coef=self.mem_coef,
                          clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high, kl_coef=self.kl_coef,
                          tis=self.tis, tis_cap=self.tis_cap)

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` for optimizer step ``step`` (0-based)."""
        if self.schedule == "constant":
            return 1.0
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        if self.schedule == "warmup" or step < self.warmup_steps:
            return warm
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
