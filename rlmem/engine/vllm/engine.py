"""The ``vllm`` rollout engine: vLLM generation with NGC eviction inside the engine.

vLLM starts lazily, at the first ``generate``, so that its KV block size can be the NGC block size
of the first eviction config (docs/design.md section 1: ``b`` equal to vLLM's block size makes a
round a permutation of whole blocks); a later config with another block size is refused, before
anything runs, with the reason. The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
so a Ray rollout actor holds exactly one engine and nothing else has to be spawned.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from rlmem.dtypes import canonical
from rlmem.engine.base import GenerationStats
from rlmem.engine.registry import engine_traits
from rlmem.engine.sampling import SamplingParams
from rlmem.engine.vllm.internals import adapt, check_classes, check_live
from rlmem.engine.vllm.records import assemble
from rlmem.engine.vllm.version import require_pinned
from rlmem.engine.vllm.weights import RpcTransport, WeightTransport
from rlmem.eviction.policy import EvictionConfig
from rlmem.eviction.record import RolloutRecord
from rlmem.eviction.scorers import get_scorer

SCHEDULER = "rlmem.engine.vllm.scheduler.NGCScheduler"
WORKER_EXTENSION = "rlmem.engine.vllm.worker.NGCWorkerExtension"


def cuda_present() -> bool:
    return torch.cuda.is_available()


def engine_dtype(dtype: str | None, *, cuda: bool) -> str:
    """The dtype vLLM runs in: bfloat16 on CUDA, float32 on CPU unless asked; fp32 on CUDA refused.

    vLLM's FlashAttention takes only fp16/bf16 (vllm/v1/attention/backends/flash_attn.py:287), so
    fp32 on CUDA would get TRITON_ATTN, whose cache rlmem cannot read (see :mod:`.layouts`).
    """
    if dtype is None:
        return "bfloat16" if cuda else "float32"
    dtype = canonical(dtype, choices=engine_traits("vllm").dtypes, what="dtype (vLLM engine)")
    if cuda and dtype == "float32":
        raise ValueError("dtype (vLLM engine): float32 on CUDA is refused: vLLM's FlashAttention takes only "
                         "bfloat16/float16 (flash_attn.py:287) and rlmem reads no other CUDA backend; use bfloat16")
    return dtype


def check_block_size(block_size: int, *, cuda: bool) -> None:
    """vLLM's attention kernels fix which KV block sizes exist; NGC's ``b`` must be one of them."""
    need = 16 if cuda else 32
    if block_size % need:
        raise ValueError(f"eviction.block_size={block_size}: the vLLM engine uses NGC's block size as vLLM's KV "
                         f"block size (a round then moves whole blocks), and vLLM's "
                         f"{'CUDA' if cuda else 'CPU'} attention needs a multiple of {need}; use 32 or 64")


def check_eviction(cfg: EvictionConfig, block_size: int | None) -> None:
    """Refuse settings this engine cannot run, before vLLM starts or a request is sent."""
    if block_size is not None and cfg.block_size != block_size:
        raise ValueError(f"eviction.block_size={cfg.block_size} but this vLLM engine runs with KV block size "
                         f"{block_size}: NGC's block size must equal vLLM's (one engine, one block size)")
    if cfg.protect_recent < 1:
        raise ValueError("eviction.protect_recent=0 is not supported by the vLLM engine: every layer must keep "
                         "the same number of tokens (one block table per request); use protect_recent >= 1")
    if get_scorer(cfg.scorer).observes:
        raise ValueError(f"eviction.scorer={cfg.scorer!r} observes every decoding step; the vLLM engine runs "
                         "scorers that look at the cache at round time only (use --backend torch)")


@dataclass
class VllmGenerationStats(GenerationStats):
    """Plus vLLM's block-pool counters of the call."""

    peak_running: int = 0         # most sequences scheduled in one step
    freed_blocks: int = 0         # blocks the rounds returned to the pool


class VllmEngine:
    """NGC rollouts in vLLM (one engine per process / Ray actor)."""

    name = "vllm"

    def __init__(self, model_path: str, *, dtype: str | None = None, seed: int = 0, block_size: int | None = None,
                 num_kv_blocks: int | None = None, max_num_seqs: int = 256, max_model_len: int | None = None,
                 kv_cache_gib: int = 1, enforce_eager: bool = True, gpu_memory_utilization: float = 0.6,
                 ignore_eos: bool = False, bucket_bytes: int = 64 << 20, trace_blocks: bool = False):
        require_pinned()
        cfg_path = Path(model_path) / "config.json"
        if not cfg_path.is_file():
            raise ValueError(f"{model_path}: no config.json (a local HF model directory is expected)")
        dtype = engine_dtype(dtype, cuda=cuda_present())
        self.model_path, self.dtype, self.seed = str(model_path), dtype, seed
        self.num_layers = int(json.loads(cfg_path.read_text())["num_hidden_layers"])
        self.options = dict(num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                            kv_cache_gib=kv_cache_gib, enforce_eager=enforce_eager,
                            gpu_memory_utilization=gpu_memory_utilization)
        self.ignore_eos, self.bucket_bytes, self.trace_blocks = ignore_eos, bucket_bytes, trace_blocks
        self.block_size = block_size
        if block_size is not None:
            check_block_size(block_size, cuda=cuda_present())
        self.llm = None
        self.asleep = False
        self.weights_lost = False     # after a level-2 sleep, until the next commit_weights
        self.info: dict = {}
        self.transport: WeightTransport | None = None
        self.last_stats: GenerationStats = VllmGenerationStats()
        self._n = 0

    # ------------------------------------------------------------------ start-up
    def start(self, block_size: int | None = None) -> None:
        """Start vLLM with KV block size ``block_size`` (NGC's ``b``; default 32)."""
        if self.llm is not None:
            return
        self.block_size = self.block_size or block_size or 32
        check_block_size(self.block_size, cuda=cuda_present())
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"          # the V1 runner: the one the CPU runner subclasses
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"    # engine core in this process
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.options["kv_cache_gib"]))
        from vllm import LLM

        check_classes("cuda" if cuda_present() else "cpu")   # one line naming a changed internal, before vLLM starts
        o = self.options
        kwargs = dict(model=self.model_path, tokenizer=self.model_path, dtype=self.dtype, seed=self.seed,
                      block_size=self.block_size, enable_prefix_caching=False, enforce_eager=o["enforce_eager"],
                      scheduler_cls=SCHEDULER, worker_extension_cls=WORKER_EXTENSION,
                      max_num_seqs=o["max_num_seqs"], logprobs_mode="raw_logits", async_scheduling=False,
                      disable_log_stats=True)
        if o["max_model_len"]:
            kwargs["max_model_len"] = o["max_model_len"]
        if o["num_kv_blocks"]:
            kwargs["num_gpu_blocks_override"] = o["num_kv_blocks"]
        if cuda_present():
            kwargs["gpu_memory_utilization"] = o["gpu_memory_utilization"]
            kwargs["enable_sleep_mode"] = True
            if not o["enforce_eager"]:   # full CUDA graphs would replay decode without the Python hooks
                kwargs["compilation_config"] = {"cudagraph_mode": "PIECEWISE"}
        else:
            kwargs["enforce_eager"] = True   # CPU: no graphs to gain, and compilation slows start-up
        self.llm = LLM(**kwargs)
        check_live("LLM", self.llm)
        self.info = self.llm.collective_rpc("rlmem_install", args=(self.seed,))[0]
        if self.info["num_layers"] != self.num_layers:
            raise RuntimeError(f"vLLM engine sees {self.info['num_layers']} attention layers, config.json says {self.num_layers}")
        self.transport = RpcTransport(self.llm, self.bucket_bytes, device="cuda" if cuda_present() else "cpu")
        if self.trace_blocks:
            self.scheduler.rlmem_trace = []

    @property
    def scheduler(self):
        """The engine core's scheduler (in this process): block-pool counters for tests and benchmarks."""
        return adapt("LLM", self.llm).llm_engine.engine_core.engine_core.scheduler

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 eviction: EvictionConfig | list[EvictionConfig | None] | None = None, *,
                 greedy_evictions: bool = False) -> list[RolloutRecord]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        cfgs = list(eviction) if isinstance(eviction, (list, tuple)) else [eviction] * len(prompts)
        if len(cfgs) != len(prompts):
            raise ValueError(f"generate: {len(cfgs)} eviction configs for {len(prompts)} prompts")
        cfgs = [c if c is not None and c.enabled else None for c in cfgs]
        active = [c for c in cfgs if c is not None]
        block_size = self.block_size or (active[0].block_size if active else None)
        for c in active:
            check_eviction(c, block_size)
        self.start(block_size)
        if self.weights_lost:
            raise RuntimeError("vLLM engine: generate after sleep() needs a weight load first (level-2 sleep "
                               "discarded the weights)")
        self.wake_up()
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        from rlmem.engine.vllm.requests import to_extra_args

        keys, params = [], []
        for i, c in enumerate(cfgs):
            self._n += 1
            key = f"rlmem-{uuid.uuid4().hex[:8]}-{self._n}"
            keys.append(key)
            params.append(VSP(n=1, temperature=float(sampling.temperature), top_k=int(sampling.top_k or 0),
                              top_p=float(sampling.top_p), max_tokens=int(sampling.max_new_tokens),
                              stop=list(sampling.stop) or None, include_stop_str_in_output=True,
                              ignore_eos=self.ignore_eos, logprobs=0,
                              seed=None if sampling.seed is None else int(sampling.seed) + i,
                              extra_args=to_extra_args(key, c, greedy_evictions)))
        sched = self.scheduler
        freed0, rounds0 = sched.rlmem_freed_blocks, sched.rlmem_rounds
        sched.rlmem_peak_running = sched.rlmem_peak_used = 0
        t0 = time.perf_counter()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        decisions = self.llm.collective_rpc("rlmem_take", args=(keys,))[0]
        records = [assemble(list(p), o.outputs[0], sampling.temperature, c, decisions.get(k))
                   for p, o, c, k in zip(prompts, outs, cfgs, keys)]
        self.last_stats = VllmGenerationStats(
            new_tokens=sum(len(r.completion_ids) for r in records), seconds=seconds,
            rounds=sched.rlmem_rounds - rounds0, peak_cache_bytes=sched.rlmem_peak_used * self.block_bytes,
            per_row_peak=[r.extra["peak_kv"] for r in records], peak_running=sched.rlmem_peak_running,
            freed_blocks=sched.rlmem_freed_blocks - freed0)
        return records

    def set_max_running(self, n: int) -> None:
        """Cap the sequences vLLM admits at once (benchmarks: as many as the KV pool holds without preemption)."""
        self.start(self.block_size)
        adapt("Scheduler", self.scheduler).max_num_active_reqs = int(n)

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block over all layers (K and V)."""
        return self.scheduler.page_bytes() * self.num_layers

    # ------------------------------------------------------------------ weights
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Learner weights (HF names) into the running engine, in buckets (see :mod:`.weights`)."""
        self.stage_weights(named_tensors)
        self.commit_weights()

    def stage_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """One part of a weight update (e.g. one sync bucket); nothing changes until :meth:`commit_weights`,
        because vLLM's in-place reload must see every tensor of a fused layer at once."""
        self.start(self.block_size)
        self.wake_up()
        return self.transport.stage(named_tensors)

    def stage_bucket(self, bucket) -> int:
        """Stage one ready :class:`~rlmem.models.weight_buckets.Bucket` as it is (no copy; the weight
        sync's received buckets); loaded by :meth:`commit_weights`."""
        self.start(self.block_size)
        self.wake_up()
        return self.transport.stage_bucket(bucket)

    def commit_weights(self) -> int:
        self.start(self.block_size)
        n = self.transport.commit()
        self.weights_lost = False
        return n

    def sleep(self) -> str | None:
        """Colocated CUDA training: free the engine's GPU memory (weights and KV cache, vLLM's sleep
        level 2: the next weight sync loads every weight anyway) until :meth:`wake_up`. Returns None,
        or why nothing was freed."""
        if not cuda_present():
            return "vLLM's sleep mode is CUDA-only: the CPU engine keeps its memory"
        if self.llm is None:
            return "vLLM has not started yet: nothing to free"
        if not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = self.weights_lost = True
        return None

    def wake_up(self) -> None:
        """Reallocate what :meth:`sleep` freed (weights hold garbage until the next weight load;
        the weight sync loads every parameter right after). Generation and weight loads wake first."""
        if self.asleep and self.llm is not None:
            self.llm.wake_up()
            self.asleep = False

    def shutdown(self) -> None:
        if self.llm is not None:
            adapt("LLM", self.llm).llm_engine.engine_core.shutdown()
            self.llm = None


def from_pretrained(model_path: str, *, dtype: str | None = None, seed: int = 0, **options) -> VllmEngine:
    """The registry's factory for ``vllm`` (:mod:`rlmem.engine.registry`)."""
    return VllmEngine(model_path, dtype=dtype, seed=seed, **options)
