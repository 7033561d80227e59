"""GPU memory arithmetic of the two placements: what a learner rank and a vLLM engine hold on a GPU.

One function computes it for the code and for docs/gpu.md (``python -m rlmem.train.gpu_memory``
prints the doc's tables), so the fraction a colocated rollout worker hands vLLM
(``gpu_memory_utilization``) is the number the doc shows. The terms are estimates of what
DeepSpeed and vLLM allocate with rlmem's settings (bf16 weights, fp32 master weights and AdamW
states, DeepSpeed's default reduce bucket); each row says its formula.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 2**30
CUDA_CONTEXT = int(0.5 * GIB)          # per process: CUDA context, cuBLAS/NCCL workspaces
ENGINE_OVERHEAD = 2 * GIB              # vLLM: profiled activations, sampler, CUDA graphs (piecewise)
REDUCE_BUCKET_ELEMENTS = 500_000_000   # DeepSpeed's default zero_optimization.reduce_bucket_size
MARGIN = 1 * GIB                       # fragmentation of PyTorch's caching allocator


@dataclass(frozen=True)
class ModelDims:
    """The numbers of a decoder-only (Qwen2/Llama) config that set its memory."""

    layers: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    tied_embeddings: bool = False
    qkv_bias: bool = True

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelDims":
        """From a HF ``config.json`` dict."""
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(int(cfg["num_hidden_layers"]), hidden, heads, int(cfg.get("num_key_value_heads", heads)),
                   int(cfg.get("head_dim") or hidden // heads), int(cfg["vocab_size"]),
                   int(cfg["intermediate_size"]), bool(cfg.get("tie_word_embeddings", False)),
                   cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False)))

    @classmethod
    def from_path(cls, model_dir: str | Path) -> "ModelDims":
        return cls.from_config(json.loads((Path(model_dir) / "config.json").read_text()))

    @property
    def params(self) -> int:
        """Parameter count, embeddings (and an untied LM head) included."""
        h, q, kv = self.hidden, self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        per_layer = attn + 3 * h * self.intermediate + 2 * h
        emb = self.vocab * h * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + emb + h

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of one token over all layers: ``2 × layers × kv_heads × head_dim × bytes``."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


# DeepSeek-R1-Distill-Qwen-1.5B's config.json (Qwen2, untied LM head): the paper's model.
R1_DISTILL_1P5B = ModelDims(layers=28, hidden=1536, q_heads=12, kv_heads=2, head_dim=128, vocab=151936,
                            intermediate=8960, tied_embeddings=False)


@dataclass(frozen=True)
class Workload:
    """The run settings that size memory (from a run config: :func:`workload_of`)."""

    zero_stage: int = 2
    learner_ranks: int = 4
    micro_batch: int = 8
    prompt_len: int = 256               # longest prompt the sizing allows for
    completion_len: int = 1024          # rollout.max_new_tokens
    gradient_checkpointing: bool = True
    kl_reference: bool = False          # algorithm.kl_coef > 0: a frozen bf16 copy on the learner's GPU
    offload_optimizer: bool = False
    rollout_seqs: int = 128             # sequences one engine holds at once (its share of a step)
    bucket_bytes: int = 256 * 2**20     # ray.weight_sync_bucket_mb


def workload_of(cfg, prompt_len: int = 256) -> Workload:
    """The :class:`Workload` of a run config (``prompt_len``: an allowance, prompts are not known ahead)."""
    a = cfg.algorithm
    return Workload(zero_stage=cfg.learner.zero_stage, learner_ranks=cfg.learner.num_workers,
                    micro_batch=cfg.learner.micro_batch_size, prompt_len=prompt_len,
                    completion_len=cfg.rollout.max_new_tokens,
                    gradient_checkpointing=cfg.learner.gradient_checkpointing, kl_reference=a.kl_coef > 0,
                    offload_optimizer=cfg.learner.offload_optimizer,
                    rollout_seqs=math.ceil(a.prompts_per_step * a.rollouts_per_prompt / cfg.rollout.num_workers),
                    bucket_bytes=cfg.ray.weight_sync_bucket_mb * 2**20)


@dataclass(frozen=True)
class Row:
    what: str
    bytes: int
    formula: str


def learner_rows(m: ModelDims, w: Workload) -> tuple[list[Row], list[Row]]:
    """(resident between steps, added during the learner step) for one rank."""
    P, n = m.params, w.learner_ranks
    part = n if w.zero_stage >= 1 else 1
    resident = [Row("CUDA context", CUDA_CONTEXT, "0.5 GiB"),
                Row("bf16 weights", 2 * P // (n if w.zero_stage >= 3 else 1),
                    "2P" + (f"/{n} (ZeRO 3)" if w.zero_stage >= 3 else ""))]
    if not w.offload_optimizer:
        resident.append(Row("fp32 master + AdamW m, v + fp32 grad partition", 16 * P // part,
                            f"16P/{part} (ZeRO {w.zero_stage})" if part > 1 else "16P (ZeRO 0)"))
    if w.zero_stage >= 2:
        resident.append(Row("ZeRO 2 reduce bucket (bf16)", REDUCE_BUCKET_ELEMENTS * 2, "5e8 elements x 2 B (DeepSpeed default)"))
    if w.kl_reference:
        resident.append(Row("KL reference (bf16, frozen)", 2 * P, "2P"))
    T, Tc, B, h = w.prompt_len + w.completion_len, w.completion_len, w.micro_batch, m.hidden
    q, kv = m.q_heads * m.head_dim, m.kv_heads * m.head_dim
    one_layer = B * T * (2 * h + q + 2 * kv + 3 * m.intermediate + 2 * h) * 2
    step = [Row("bf16 gradients", 2 * P // (n if w.zero_stage >= 2 else 1),
                f"2P/{n} (ZeRO 2)" if w.zero_stage >= 2 else "2P")]
    if w.gradient_checkpointing:
        step.append(Row("activations (checkpointed)", m.layers * B * T * h * 2 + one_layer,
                        f"layers x B x T x h x 2 + one layer recomputed (B={B}, T={T})"))
    else:
        step.append(Row("activations", m.layers * one_layer, f"layers x B x T x (6h + q + 2kv + 3I) x 2 (B={B}, T={T})"))
    step.append(Row("logits (bf16, fp32 upcast, /T, log-softmax)", B * Tc * m.vocab * 14,
                    f"B x Tc x V x 14 B (Tc={Tc})"))
    return resident, step


def engine_rows(m: ModelDims, w: Workload) -> list[Row]:
    """What one vLLM engine needs to hold its share of a step's rollouts at full cache."""
    T = w.prompt_len + w.completion_len
    return [Row("CUDA context", CUDA_CONTEXT, "0.5 GiB"),
            Row("bf16 weights", 2 * m.params, "2P"),
            Row("activations, sampler, graphs", ENGINE_OVERHEAD, "2 GiB allowance"),
            Row("KV cache (full cache)", w.rollout_seqs * T * m.kv_bytes_per_token(),
                f"{w.rollout_seqs} seqs x {T} tokens x {m.kv_bytes_per_token()} B")]


def total(rows: list[Row]) -> int:
    return sum(r.bytes for r in rows)


@dataclass(frozen=True)
class ColocatedPlan:
    """One GPU shared by learner rank i and rollout engine i (vLLM asleep during the learner step)."""

    gpu_bytes: int
    learner_resident: int
    learner_step: int
    sync_staging: int
    engine_need: int
    engine_budget: int
    vllm_fraction: float          # vLLM's gpu_memory_utilization: its budget over the GPU's memory

    @property
    def problem(self) -> str | None:
        """Why the two cannot share this GPU, or None."""
        gib = lambda b: f"{b / GIB:.1f} GiB"   # noqa: E731
        peak = self.learner_resident + self.learner_step + CUDA_CONTEXT
        if peak > self.gpu_bytes:
            return (f"the learner step needs {gib(peak)} (with the sleeping engine's context) but the GPU has "
                    f"{gib(self.gpu_bytes)}: lower learner.micro_batch_size or raise learner.zero_stage")
        if self.engine_budget < self.engine_need:
            return (f"the vLLM engine gets {gib(self.engine_budget)} ({self.vllm_fraction:.2f} of the GPU) but its "
                    f"rollouts need {gib(self.engine_need)}: use placement split, more workers, or a shorter "
                    f"rollout.max_new_tokens")
        return None


def colocated_plan(m: ModelDims, w: Workload, gpu_bytes: int) -> ColocatedPlan:
    """The colocated split of ``gpu_bytes``.

    While rollouts run, the learner keeps its resident memory (weights, optimizer states) and, during
    a weight sync, the bucket copies it shares by CUDA IPC (2P); vLLM gets the rest less a margin.
    During the learner step vLLM sleeps (level 2: weights and KV cache freed), so the step's
    gradients, activations and logits use the memory the KV cache had.
    """
    resident, step = learner_rows(m, w)
    res, stp = total(resident), total(step)
    staging = 2 * m.params
    budget = gpu_bytes - res - staging - MARGIN
    fraction = max(0.0, math.floor(100 * budget / gpu_bytes) / 100)
    return ColocatedPlan(gpu_bytes, res, stp, staging, total(engine_rows(m, w)), int(fraction * gpu_bytes), fraction)


def split_kv_tokens(m: ModelDims, gpu_bytes: int, vllm_fraction: float) -> int:
    """Split placement: the tokens of KV cache a vLLM engine with ``gpu_memory_utilization`` =
    ``vllm_fraction`` holds on its own GPU (its budget less weights and the activation allowance)."""
    kv = vllm_fraction * gpu_bytes - 2 * m.params - ENGINE_OVERHEAD
    return max(0, int(kv // m.kv_bytes_per_token()))


def colocated_gpu_shares(gpus_per_bundle: float) -> tuple[float, float]:
    """Ray GPU requests of (rollout worker, learner rank) in one colocated bundle: they sum to the
    bundle's GPUs, so Ray puts both on the same GPU. Ray's fractions only place actors; memory is
    split by vLLM's ``gpu_memory_utilization`` (:func:`colocated_plan`)."""
    half = gpus_per_bundle / 2
    return half, gpus_per_bundle - half


def _table(rows: list[Row]) -> list[str]:
    out = ["| term | formula | GiB |", "|---|---|---:|"]
    out += [f"| {r.what} | {r.formula} | {r.bytes / GIB:.2f} |" for r in rows]
    out.append(f"| **total** | | **{total(rows) / GIB:.2f}** |")
    return out


def report(m: ModelDims = R1_DISTILL_1P5B, w: Workload = Workload(), gpu_gib: float = 80.0,
           split_fraction: float = 0.6) -> str:
    """docs/gpu.md's memory tables (markdown)."""
    gpu = int(gpu_gib * 1e9)
    resident, step = learner_rows(m, w)
    plan = colocated_plan(m, w, gpu)
    lines = [f"P = {m.params:,} parameters; KV cache {m.kv_bytes_per_token():,} B per token; GPU {gpu_gib:g} GB "
             f"= {gpu / GIB:.1f} GiB; settings {asdict(w)}", "", "Learner rank, resident between steps:", ""]
    lines += _table(resident) + ["", "Learner rank, added during the learner step:", ""] + _table(step)
    lines += ["", "vLLM engine, holding its share of a step at full cache:", ""] + _table(engine_rows(m, w))
    lines += ["", "Colocated (one GPU per learner rank and engine):", "",
              "| quantity | GiB |", "|---|---:|",
              f"| learner resident | {plan.learner_resident / GIB:.2f} |",
              f"| weight-sync buckets held for CUDA IPC (2P) | {plan.sync_staging / GIB:.2f} |",
              f"| margin | {MARGIN / GIB:.2f} |",
              f"| vLLM budget = GPU - the above | {plan.engine_budget / GIB:.2f} |",
              f"| vLLM needs | {plan.engine_need / GIB:.2f} |",
              f"| learner step peak (engine asleep) | {(plan.learner_resident + plan.learner_step + CUDA_CONTEXT) / GIB:.2f} |",
              "", f"vLLM gpu_memory_utilization (colocated) = {plan.vllm_fraction:.2f}"
              + ("" if plan.problem is None else f"; does not fit: {plan.problem}"),
              "", f"Split (own GPUs): learner step peak {(plan.learner_resident + plan.learner_step) / GIB:.2f} GiB "
              f"of {gpu / GIB:.1f}; vLLM at gpu_memory_utilization {split_fraction:g} holds "
              f"{split_kv_tokens(m, gpu, split_fraction):,} tokens of KV cache "
              f"({split_kv_tokens(m, gpu, split_fraction) // (w.prompt_len + w.completion_len):,} full-cache sequences "
              f"of {w.prompt_len + w.completion_len} tokens; its share of a step is {w.rollout_seqs})"]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
