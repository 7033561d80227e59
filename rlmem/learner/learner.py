"""The DeepSpeed learner: replay rollout records, NGC loss, one optimizer step per (mini)batch.

A plain class, used in-process (tests, single-process runs) and inside a Ray actor (one instance
per data-parallel rank; the actor wrapper and driver live elsewhere)::

    learner = Learner(LearnerConfig(model_path=..., max_len=256), rank=r, world_size=n, master_port=p)
    metrics = learner.train_step(records, advantages, global_num_sequences=G)   # on every rank
    for name, tensor in learner.named_parameters_for_sync(): ...                # on every rank
    learner.save_checkpoint(dir, client_state) / learner.load_checkpoint(dir) -> client_state
    learner.export_hf(dir)

**Exact full-batch gradient.** Each rank gets its share of the global batch. Every micro-batch
loss uses the *global* denominators (``global_num_sequences``, and the global completion-token
count for ``token_mean``, all-reduced here), so the sum of all micro-batch losses over all ranks
is the full-batch loss (rlmem.learner.loss). DeepSpeed runs with ``gradient_accumulation_steps = 1`` and
the accumulation boundary set by hand (so ``engine.backward`` does not divide by a step count),
and its data-parallel all-reduce *averages* gradients, so each micro-batch loss is multiplied by
``world_size`` before ``engine.backward``. The result is the gradient of the full-batch loss,
whatever the micro-batch size and number of ranks (tested).

**Devices.** Each rank runs where its device plan says (:mod:`rlmem.devices`, worked out in the
rank's own process: the Ray actor's GPU, or the CPU), with DeepSpeed's accelerator, the
process-group backend and ``LOCAL_RANK`` (the index among the GPUs this process sees, not the
global rank) taken from it. Counts and metrics are all-reduced through :mod:`rlmem.collectives`,
which puts them on the process group's device (NCCL takes CUDA tensors only). The frozen KL
reference sits on the rank's device in the learner's dtype (``learner.kl_ref_device: auto``), or
on the CPU when ``learner.kl_ref_device: cpu`` offloads it.

**Collectives.** ``train_step``, ``named_parameters_for_sync``, ``save_checkpoint`` /
``load_checkpoint`` and ``export_hf`` are collective: every rank calls them, in the same order.
ZeRO 2/3 reduce gradients on every backward, so ranks with fewer micro-batches run zero-weight
padding micro-batches to match the busiest rank; a rank may not get zero records.

**Mini-batches / PPO epochs.** With ``mini_batches = M`` each rank splits its records into ``M``
contiguous parts (one optimizer step each, global denominator ``global_num_sequences / M``),
repeated ``ppo_epochs`` times. The "old" log-probabilities of the clipped surrogate are the
records' rollout log-probs (the behaviour policy), for tokens and evictions alike; reusing a batch
without ``clip_eps`` is refused.

**Truncated importance sampling** (``tis``, docs/design.md section 5, "The objective for stale
rollouts"). The surrogate's reference is then ``π_prox``, this rank's own log-probs under the
weights at the start of ``train_step``, and the records' log-probs only enter the truncated weight.
With one update per call (``mini_batches = ppo_epochs = 1``) ``π_prox`` is the detached output of
the training forward itself (no extra cost); otherwise one no-grad replay pass over the rank's
records before the first optimizer step computes it (the same number of forwards on every rank).

**Metrics** (identical on all ranks, all-reduced): ``loss``, ``loss/token``, ``loss/eviction`` (mean
over the optimizer steps of the global mini-batch loss), ``grad_norm`` (last step, before
clipping), ``lr`` (the lr the last step used), ratio / clip statistics for ``token/`` and
``eviction/`` actions over all passes (``ratio_mean`` / ``clip_frac…`` / ``approx_kl`` weighted by
action counts, ``ratio_min`` / ``ratio_max`` over every action), with ``tis`` also
``tis_weight_mean/min/max``, ``tis_clip_frac`` and ``engine_mismatch_kl``, ``replay/max_abs_logprob_diff``
and ``replay/max_abs_eviction_logprob_diff`` (replay vs the records' rollout values, measured on the
passes before this call's first optimizer step: the whole batch when ``mini_batches = 1``),
token counts and per-phase seconds (slowest rank).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from rlmem import collectives
from rlmem.devices import DevicePlan, apply_plan, current_plan
from rlmem.eviction.record import RolloutRecord
from rlmem.learner.loss import ngc_loss
from rlmem.learner.config import LearnerConfig

__all__ = ["Learner", "LearnerConfig", "init_distributed", "kl_reference_device"]


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, plan: DevicePlan) -> None:
    """Initialise torch.distributed through DeepSpeed, from explicit arguments and this rank's plan.

    ``LOCAL_RANK`` is ``plan.local_rank`` (the index among this process's visible GPUs; rank 1 of a
    Ray run sees one GPU, ``cuda:0``), the backend ``plan.backend`` (NCCL on CUDA, gloo on the CPU).
    """
    import torch.distributed as dist

    apply_plan(plan)   # DeepSpeed's accelerator is fixed when it is first imported: set it before
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}, not rank {rank} of {world_size}")
        return
    import deepspeed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR=master_addr,
                      MASTER_PORT=str(master_port), LOCAL_RANK=str(plan.local_rank),
                      LOCAL_SIZE=os.environ.get("LOCAL_SIZE", str(world_size)))
    if plan.accelerator == "cpu":   # DeepSpeed's CPU collectives leak /dev/shm buffers (cpu_comm)
        from rlmem.learner.deepspeed_shm import tidy_before_init
        tidy_before_init()
    # DeepSpeed caches its clone of the world group for the life of the process. If another library
    # destroyed the process group since (vLLM's in-process engine does at shutdown), that clone
    # belongs to no group: a new learner in this process would fail in deepspeed.initialize with
    # "Group ... is not registered". A fresh init gets a fresh clone.
    import deepspeed.utils.groups as ds_groups

    ds_groups._WORLD_GROUP = None
    deepspeed.init_distributed(dist_backend=plan.backend, auto_mpi_discovery=False, rank=rank,
                               world_size=world_size, verbose=False)


def kl_reference_device(setting: str, plan: DevicePlan) -> str:
    """Where the KL reference lives: ``learner.kl_ref_device`` ``auto`` = the rank's planned device,
    ``cpu`` = offloaded to the CPU on purpose."""
    if setting not in ("auto", "cpu"):
        raise ValueError(f"learner.kl_ref_device: must be auto or cpu (got {setting!r})")
    return "cpu" if setting == "cpu" else plan.device


class _ReplayLoss(torch.nn.Module):
    """What DeepSpeed wraps: the HF policy plus a forward that replays records and returns the loss.

    Going through ``engine(...)`` lets DeepSpeed run its backward prologue (ZeRO bookkeeping) and
    ZeRO-3 parameter gathering around the replay.
    """

    def __init__(self, policy: torch.nn.Module, cfg: LearnerConfig, reference: torch.nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.cfg = cfg
        self.loss_cfg = cfg.loss_config()
        # The frozen KL reference, kept in a tuple so that it is not a submodule: DeepSpeed must not
        # see, partition or optimise its parameters (nor move them: the Learner puts it on its device).
        self._reference = (reference,) if reference is not None else ()

    def forward(self, records: list[RolloutRecord], advantages: torch.Tensor | None, weight: float,
                num_sequences: int, num_tokens: int | None, prox: tuple[torch.Tensor, torch.Tensor] | None = None,
                prox_only: bool = False):
        """The weighted loss and its stats; ``prox``: the start-of-step (token, eviction) log-probs
        for ``tis`` (``None``: this forward's own, detached). ``prox_only``: just this replay's
        detached (token, eviction) log-probs (call it under ``torch.no_grad``)."""
        from rlmem.learner.replay import replay_forward, rollout_logprobs

        out = replay_forward(self.policy, records, kernel=self.cfg.replay_kernel,
                             compute_eviction=self.cfg.compute_eviction, mask=self.cfg.replay_mask)
        if prox_only:
            return out.token_logprobs.detach(), out.eviction_logprobs.detach()
        dev = out.token_logprobs.device
        old = rollout_logprobs(records, self.policy.config.num_hidden_layers, device=dev,
                               dtype=out.token_logprobs.dtype)
        old_tok, old_ev = old.token_logprobs, old.eviction_logprobs
        ev_lp = out.eviction_logprobs if self.cfg.compute_eviction else None
        ref_tok = None
        if self._reference:
            # π_ref under the same masks: the same surviving cache the sampled tokens saw.
            with torch.no_grad():
                ref_tok = replay_forward(self._reference[0], records, kernel=self.cfg.replay_kernel,
                                         compute_eviction=False, mask=self.cfg.replay_mask).token_logprobs.to(dev)
        prox_kw = {}
        if self.loss_cfg.tis is not None:
            p_tok, p_ev = prox if prox is not None else (out.token_logprobs.detach(), out.eviction_logprobs.detach())
            prox_kw = dict(prox_token_logprobs=p_tok.to(dev, out.token_logprobs.dtype),
                           prox_eviction_logprobs=p_ev.to(dev, out.token_logprobs.dtype) if ev_lp is not None else None)
        loss, stats = ngc_loss(out.token_logprobs, old_tok, out.token_mask.to(dev), ev_lp, old_ev,
                               out.round_mask.to(dev) if ev_lp is not None else None,
                               advantages.to(dev), self.loss_cfg, num_sequences=num_sequences,
                               num_tokens=num_tokens, ref_token_logprobs=ref_tok, **prox_kw)
        with torch.no_grad():
            m = out.token_mask.to(dev)
            d = (out.token_logprobs.detach() - old_tok).abs()[m]
            stats["replay/max_abs_logprob_diff"] = float(d.max()) if d.numel() else 0.0
            stats["replay/sum_abs_logprob_diff"] = float(d.double().sum())
            if ev_lp is not None and ev_lp.numel():
                rm = out.round_mask.to(dev)[:, :, None].expand_as(ev_lp)
                de = (ev_lp.detach() - old_ev).abs()[rm]
                stats["replay/max_abs_eviction_logprob_diff"] = float(de.max()) if de.numel() else 0.0
            else:
                stats["replay/max_abs_eviction_logprob_diff"] = 0.0
        return loss * weight, stats


# Stats summed over micro-batches and ranks, stats averaged weighted by their action counts, maxima.
_SUM_KEYS = ("loss", "loss/token", "loss/eviction", "loss/kl", "replay/sum_abs_logprob_diff")
_TIS_WEIGHTED = ("tis_weight_mean", "tis_clip_frac", "engine_mismatch_kl")   # only with algorithm.tis
_WEIGHTED = {"token": ("ratio_mean", "approx_kl", "kl_ref_mean", "clip_frac", "clip_frac_low", "clip_frac_high")
                      + _TIS_WEIGHTED,
             "eviction": ("ratio_mean", "approx_kl", "clip_frac", "clip_frac_low", "clip_frac_high") + _TIS_WEIGHTED}
_MAX_KEYS = ("replay/max_abs_logprob_diff", "replay/max_abs_eviction_logprob_diff")
# Per-action extremes over every micro-batch with actions, every pass and every rank.
_EXTREMES = {f"{kind}/{k}": op for kind in ("token", "eviction")
             for k, op in (("ratio_min", "min"), ("ratio_max", "max"), ("tis_weight_min", "min"),
                           ("tis_weight_max", "max"))}


def _pad_prox(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-record (token ``[T_i]``, eviction ``[R_i, L]``) log-probs, right-padded with 0, in
    the layout :func:`rlmem.learner.replay.replay_forward` gives these records."""
    tc = max(t.shape[0] for t, _ in rows)
    r_max = max(e.shape[0] for _, e in rows)
    tok = torch.stack([torch.nn.functional.pad(t, (0, tc - t.shape[0])) for t, _ in rows])
    ev = torch.stack([torch.nn.functional.pad(e, (0, 0, 0, r_max - e.shape[0])) for _, e in rows])
    return tok, ev


class Learner:
    """One data-parallel rank: an HF causal LM under DeepSpeed ZeRO 0/2/3 with AdamW (module docstring)."""

    def __init__(self, cfg: LearnerConfig, rank: int = 0, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int = 29500, local_rank: int | None = None,
                 plan: DevicePlan | None = None):
        """``plan``: this rank's device plan (a Ray learner worker passes the one it made in its own
        process); ``None`` works it out here (:func:`rlmem.devices.current_plan`, ``local_rank``
        choosing the GPU outside Ray)."""
        from rlmem.models.loading import load_model, load_tokenizer

        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        if cfg.dtype == "float64" and world_size != 1:
            # DeepSpeed's gradient all-reduce rejects fp64 (not a supported accelerator dtype).
            raise ValueError("learner.dtype: float64 is for single-process parity checks (world_size 1)")
        self.plan = plan if plan is not None else current_plan(cfg.dtype, local_rank=local_rank,
                                                               what=f"learner rank {rank}")
        if self.plan.dtype != cfg.dtype:
            raise ValueError(f"learner rank {rank}: device plan dtype {self.plan.dtype} != learner.dtype {cfg.dtype}")
        init_distributed(rank, world_size, master_addr, master_port, self.plan)
        import deepspeed   # after the plan fixed its accelerator

        torch.manual_seed(cfg.seed)
        policy = load_model(cfg.model_path, cfg.dtype)
        self.tokenizer = load_tokenizer(cfg.model_path)
        policy.config.use_cache = False
        if cfg.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        reference = None
        if cfg.kl_coef > 0:
            # A full frozen copy of the starting weights on every rank (also under ZeRO 3), on the
            # rank's device in its dtype, or on the CPU when learner.kl_ref_device offloads it.
            reference = load_model(cfg.model_path, self.plan.dtype, device=self.kl_ref_device
                                   ).eval().requires_grad_(False)
            reference.config.use_cache = False
        module = _ReplayLoss(policy, cfg, reference)
        optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                      weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_factor)
        # Stage 0 fp32/fp64: DeepSpeed clips but does not report the norm, so we clip ourselves.
        self._manual_clip = cfg.zero_stage == 0 and cfg.dtype != "bfloat16"
        ds_config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": 1,    # accumulation boundary set by hand (module docstring)
            "gradient_clipping": 0.0 if (self._manual_clip or not cfg.grad_clip) else cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        if cfg.dtype == "bfloat16":
            ds_config["bf16"] = {"enabled": True}
        if cfg.offload_optimizer:
            ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
            ds_config["zero_force_ds_cpu_optimizer"] = False
        ds_config.update(cfg.ds_config_overrides)
        self.ds_config = ds_config
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config)
        if cfg.dtype == "float64":
            self.engine.enable_backward_allreduce = False   # one rank: nothing to reduce, and fp64 is refused
        self.engine.train()

    # ------------------------------------------------------------------------------------------
    @property
    def policy(self) -> torch.nn.Module:
        """The HF model (parameters partitioned under ZeRO 3)."""
        return self.engine.module.policy

    @property
    def global_step(self) -> int:
        return int(self.engine.global_steps)

    @property
    def kl_ref_device(self) -> str:
        """Where the KL reference lives: the plan's device, or ``cpu`` when ``learner.kl_ref_device`` offloads it."""
        return kl_reference_device(self.cfg.kl_ref_device, self.plan)

    @property
    def kl_reference(self) -> torch.nn.Module | None:
        """The frozen KL reference model (``None`` without ``kl_coef``)."""
        ref = self.engine.module._reference
        return ref[0] if ref else None

    def train_step(self, records: list[RolloutRecord], advantages: list[float] | torch.Tensor, *,
                   global_num_sequences: int) -> dict[str, float]:
        """Replay ``records`` (this rank's share), backprop the NGC loss, step (collective).

        ``advantages[i]`` belongs to ``records[i]``; ``global_num_sequences`` is the number of
        rollouts over all ranks (the loss's ``1/G``).
        """
        cfg = self.cfg
        t_start = time.perf_counter()
        n = len(records)
        adv = torch.as_tensor(advantages, dtype=torch.float64 if cfg.dtype == "float64" else torch.float32)
        if adv.shape != (n,):
            raise ValueError(f"advantages: {tuple(adv.shape)} values for {n} records")
        if n == 0:
            raise ValueError("train_step: this rank got no records; give every rank at least one")
        m = cfg.mini_batches
        if n % m or global_num_sequences % m:
            raise ValueError(f"mini_batches={m} must divide this rank's {n} records and the "
                             f"global_num_sequences={global_num_sequences}")
        per_mini = n // m
        minis = [list(range(i * per_mini, (i + 1) * per_mini)) for i in range(m)]
        t0 = time.perf_counter()
        prox_rows = self._proximal_logprobs(records) if cfg.tis is not None and (m > 1 or cfg.ppo_epochs > 1) \
            else None
        t_prox = time.perf_counter() - t0

        sums: dict[str, float] = {}
        extremes = {k: float("inf") if op == "min" else float("-inf") for k, op in _EXTREMES.items()}
        maxima = {k: 0.0 for k in _MAX_KEYS}
        timings = {"time/replay_forward": t_prox, "time/backward": 0.0, "time/optimizer": 0.0}
        tokens = {"tokens/replayed": 0.0, "tokens/completion": 0.0}
        grad_norm, lr, steps = 0.0, 0.0, 0
        for _ in range(cfg.ppo_epochs):
            for idx in minis:
                first_pass = steps == 0
                mb = [idx[i:i + cfg.micro_batch_size] for i in range(0, len(idx), cfg.micro_batch_size)]
                # Same number of backward passes on every rank (ZeRO reduces on each one), and the
                # global completion-token count for token_mean.
                local_tok = sum(len(records[i].completion_ids) for i in idx)
                n_micro = int(collectives.all_reduce([len(mb)], "max")[0])
                num_tokens = int(collectives.all_reduce([local_tok])[0]) \
                    if cfg.aggregation == "token_mean" else None
                num_seq = global_num_sequences // m
                for j in range(n_micro):
                    real = j < len(mb)
                    sel = mb[j] if real else mb[0]
                    recs = [records[i] for i in sel]
                    self.engine.set_gradient_accumulation_boundary(j == n_micro - 1)
                    t0 = time.perf_counter()
                    # Global denominators sum micro-batches to the full loss; × world_size undoes
                    # DeepSpeed's averaging over ranks; padding micro-batches carry weight 0.
                    prox = _pad_prox([prox_rows[i] for i in sel]) if prox_rows is not None else None
                    loss, st = self.engine(recs, adv[sel], float(self.world_size) if real else 0.0,
                                           num_seq, num_tokens, prox)
                    t1 = time.perf_counter()
                    self.engine.backward(loss)
                    timings["time/replay_forward"] += t1 - t0
                    timings["time/backward"] += time.perf_counter() - t1
                    if not real:
                        continue
                    self._accumulate(sums, st)
                    for k, op in _EXTREMES.items():
                        if k in st and st.get(f"{k.split('/')[0]}/count", 0.0) > 0:
                            extremes[k] = (min if op == "min" else max)(extremes[k], st[k])
                    tokens["tokens/replayed"] += sum(r.seq_len for r in recs)
                    tokens["tokens/completion"] += sum(len(r.completion_ids) for r in recs)
                    if first_pass:
                        for k in _MAX_KEYS:
                            maxima[k] = max(maxima[k], st.get(k, 0.0))
                t0 = time.perf_counter()
                lr = float(self.engine.get_lr()[0])
                if self._manual_clip:
                    params = [p for p in self.engine.module.parameters() if p.grad is not None]
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(
                        params, cfg.grad_clip if cfg.grad_clip else float("inf")))
                self.engine.step()
                if not self._manual_clip:
                    gn = self.engine.get_global_grad_norm()
                    grad_norm = float(gn) if gn is not None else float("nan")
                timings["time/optimizer"] += time.perf_counter() - t0
                steps += 1
        timings["time/train_step"] = time.perf_counter() - t_start
        return self._metrics(sums, maxima, timings, tokens, grad_norm, lr, steps, extremes)

    @torch.no_grad()
    def _proximal_logprobs(self, records: list[RolloutRecord]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """π_prox for ``tis``: each record's (token ``[T_i]``, eviction ``[R_i, L]``) log-probs under the
        current weights, one no-grad replay pass in micro-batches (as many forwards on every rank:
        ZeRO 3 gathers parameters collectively)."""
        mbs = self.cfg.micro_batch_size
        chunks = [list(range(i, min(i + mbs, len(records)))) for i in range(0, len(records), mbs)]
        n_micro = int(collectives.all_reduce([len(chunks)], "max")[0])
        rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        for j in range(n_micro):
            sel = chunks[j] if j < len(chunks) else chunks[0]
            tok, ev = self.engine([records[i] for i in sel], None, 0.0, 1, None, None, True)
            if j < len(chunks):
                for b, i in enumerate(sel):
                    rows.append((tok[b, : len(records[i].completion_ids)], ev[b, : records[i].num_rounds]))
        return rows

    @staticmethod
    def _accumulate(sums: dict[str, float], st: dict[str, float]) -> None:
        for k in _SUM_KEYS:
            sums[k] = sums.get(k, 0.0) + st.get(k, 0.0)
        for kind, keys in _WEIGHTED.items():
            c = st.get(f"{kind}/count", 0.0)
            sums[f"{kind}/count"] = sums.get(f"{kind}/count", 0.0) + c
            for k in keys:
                sums[f"{kind}/{k}"] = sums.get(f"{kind}/{k}", 0.0) + c * st.get(f"{kind}/{k}", 0.0)

    def _metrics(self, sums, maxima, timings, tokens, grad_norm, lr, steps, extremes) -> dict[str, float]:
        keys = sorted(sums) + sorted(tokens)
        s = collectives.all_reduce([sums[k] for k in sorted(sums)] + [tokens[k] for k in sorted(tokens)])
        tot = dict(zip(keys, s.tolist()))
        mx_keys = list(_MAX_KEYS) + sorted(timings)
        mx = collectives.all_reduce([maxima[k] for k in _MAX_KEYS] + [timings[k] for k in sorted(timings)], "max")
        out: dict[str, float] = dict(zip(mx_keys, mx.tolist()))
        for k in ("loss", "loss/token", "loss/eviction", "loss/kl"):
            out[k] = tot[k] / steps          # each optimizer step's global mini-batch loss, averaged
        for kind, ks in _WEIGHTED.items():
            c = tot[f"{kind}/count"]
            out[f"{kind}/actions"] = c
            for k in ks:
                out[f"{kind}/{k}"] = tot[f"{kind}/{k}"] / c if c else 0.0
        if not self.cfg.kl_coef > 0:   # no reference model: no KL to report
            del out["loss/kl"], out["token/kl_ref_mean"]
        ext_keys = sorted(extremes)
        lo = collectives.all_reduce([extremes[k] for k in ext_keys if _EXTREMES[k] == "min"], "min").tolist()
        hi = collectives.all_reduce([extremes[k] for k in ext_keys if _EXTREMES[k] == "max"], "max").tolist()
        vals = dict(zip([k for k in ext_keys if _EXTREMES[k] == "min"], lo))
        vals.update(zip([k for k in ext_keys if _EXTREMES[k] == "max"], hi))
        for k in ext_keys:
            out[k] = vals[k] if abs(vals[k]) != float("inf") else 1.0   # no actions: the neutral 1
        if self.cfg.tis is None:   # no importance weights: nothing of them to report
            for kind in ("token", "eviction"):
                for k in _TIS_WEIGHTED + ("tis_weight_min", "tis_weight_max"):
                    del out[f"{kind}/{k}"]
        out["replay/mean_abs_logprob_diff"] = tot["replay/sum_abs_logprob_diff"] / max(tot["token/count"], 1.0)
        out.update({k: tot[k] for k in tokens})
        out.update(grad_norm=grad_norm, lr=lr, optimizer_steps=float(steps), global_step=float(self.global_step))
        return out

    # ------------------------------------------------------------------------------------------
    def named_parameters_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(HF name, full tensor)`` for every parameter, in the training dtype (collective).

        Under ZeRO 3 each parameter is gathered and a copy is yielded; otherwise the live
        (detached) weight is yielded: copy it before the next optimizer step.
        """
        if self.cfg.zero_stage == 3:
            import deepspeed

            for name, p in self.policy.named_parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    full = p.data.detach().clone()
                yield name, full
        else:
            for name, p in self.policy.named_parameters():
                yield name, p.detach()

    def state_dict_for_export(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() if self.cfg.zero_stage != 3 else t for name, t in self.named_parameters_for_sync()}

    def export_hf(self, out_dir: str | os.PathLike) -> Path:
        """Write an HF ``save_pretrained`` directory (weights, config, tokenizer); rank 0 writes (collective)."""
        out = Path(out_dir)
        state = self.state_dict_for_export()
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            self.policy.save_pretrained(out, state_dict=state)
            self.tokenizer.save_pretrained(out)
        self._barrier()
        return out

    def save_checkpoint(self, ckpt_dir: str | os.PathLike, client_state: dict | None = None) -> None:
        """DeepSpeed checkpoint (weights, optimizer, lr schedule) plus ``client_state`` (collective)."""
        self.engine.save_checkpoint(str(ckpt_dir), tag="engine", client_state=dict(client_state or {}))
        self._barrier()

    def load_checkpoint(self, ckpt_dir: str | os.PathLike) -> dict:
        """Restore what :meth:`save_checkpoint` wrote; return its ``client_state`` (collective)."""
        path, client_state = self.engine.load_checkpoint(str(ckpt_dir), tag="engine")
        if path is None:
            raise FileNotFoundError(f"no learner checkpoint in {ckpt_dir}")
        return dict(client_state or {})

    def _barrier(self) -> None:
        collectives.barrier()
