"""Weight updates into a running vLLM engine, bucketed, behind one interface.

* CPU (and any single-process engine): flat buckets (:mod:`rlmem.models.weight_buckets`, the one
  packing every transport uses) go to every worker with ``collective_rpc("rlmem_stage_weights")``; ``rlmem_commit_weights`` then loads them with vLLM's
  in-place ``reload_weights`` (the model's ``load_weights`` maps HF names onto fused parameters,
  e.g. q/k/v into ``qkv_proj``, and the layer-wise reload re-runs the CPU weight repacking).
* CUDA colocated (learner and engine on the same GPU): the same buckets, flattened per dtype
  (:func:`rlmem.models.weight_buckets.make_buckets`), are shared as CUDA IPC handles and rebuilt in the
  worker, optionally around ``LLM.sleep`` / ``LLM.wake_up`` so the learner can use the memory
  between rollouts.

The bucketing and the IPC plan are plain functions tested on CPU; the CUDA transport itself is
covered by a ``gpu``-marked test.
"""

from __future__ import annotations

from typing import Iterable, Protocol

import torch

from rlmem.models.weight_buckets import make_buckets


class WeightTransport(Protocol):
    def stage(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Move pairs to the workers (bucketed) without loading them; return how many."""
        ...

    def commit(self) -> int:
        """Load every staged pair into the model, in place; return how many."""
        ...

    def send(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """``stage`` then ``commit``."""
        ...


def expect_all(counts: list[int], want: int, verb: str) -> None:
    """Every worker must report ``want`` tensors; otherwise the weights are half-updated: stop."""
    if any(x != want for x in counts):
        raise RuntimeError(f"vLLM weight update: a worker {verb} {counts} of {want} tensors")


def commit_staged(llm, staged: int) -> None:
    """Ask every worker to load what it staged, in place, and check each loaded all ``staged`` tensors."""
    expect_all(llm.collective_rpc("rlmem_commit_weights"), staged, "loaded")


class CpuRpcTransport:
    """Buckets through ``collective_rpc`` (tensors are copied to CPU first)."""

    def __init__(self, llm, bucket_bytes: int):
        self.llm, self.bucket_bytes = llm, bucket_bytes
        self.last_buckets = 0
        self.staged = 0

    def stage(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Send buckets to the workers without loading them yet (a reload must see every tensor of a layer)."""
        count = 0
        for bucket in make_buckets(named, self.bucket_bytes):
            expect_all(self.llm.collective_rpc("rlmem_stage_weights", args=(bucket,)), len(bucket.names), "received")
            count += len(bucket.names)
            self.last_buckets += 1
        self.staged += count
        return count

    def commit(self) -> int:
        """Load everything staged, in place; returns the tensor count."""
        commit_staged(self.llm, self.staged)
        n, self.staged = self.staged, 0
        return n

    def send(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        self.last_buckets = 0
        self.stage(named)
        return self.commit()


class CudaIpcTransport:
    """Colocated CUDA: one IPC handle per flat bucket; ``sleep``/``wake_up`` around training if asked."""

    def __init__(self, llm, bucket_bytes: int, *, sleep_between: bool = False):
        if not torch.cuda.is_available():
            raise RuntimeError("CudaIpcTransport needs CUDA")
        self.llm, self.bucket_bytes, self.sleep_between = llm, bucket_bytes, sleep_between
        self.staged = 0

    def stage(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        from torch.multiprocessing.reductions import reduce_tensor

        if self.sleep_between and not self.staged:
            self.llm.wake_up(tags=["weights"])
        count = 0
        for bucket in make_buckets(named, self.bucket_bytes, device="cuda"):
            handle = reduce_tensor(bucket.flat)
            meta = {"names": bucket.names, "shapes": bucket.shapes}
            expect_all(self.llm.collective_rpc("rlmem_load_weights_ipc", args=(handle, meta)), len(bucket.names),
                       "received")
            count += len(bucket.names)
        self.staged += count
        return count

    def commit(self) -> int:
        commit_staged(self.llm, self.staged)
        torch.cuda.synchronize()
        if self.sleep_between:
            self.llm.wake_up(tags=["kv_cache"])
        n, self.staged = self.staged, 0
        return n

    def send(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        self.stage(named)
        return self.commit()

    def sleep(self) -> None:
        """Free the engine's weights and KV cache on the GPU while the learner trains (level 2)."""
        self.llm.sleep(level=2)
