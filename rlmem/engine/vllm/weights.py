"""Weight updates into a running vLLM engine, bucketed, behind one interface.

The engine core runs in the rollout worker's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
so buckets reach vLLM's worker with ``collective_rpc("rlmem_stage_weights")`` by reference, on the
device they are on: a bucket the rollout worker received (Ray object store, a CUDA IPC handle it
opened, a broadcast: :mod:`rlmem.train.weight_sync`) is staged as it is, without a copy
(:meth:`RpcTransport.stage_bucket`); ``(name, tensor)`` pairs are bucketed once
(:mod:`rlmem.models.weight_buckets`, the one packing) on the engine's device. ``rlmem_commit_weights``
then loads everything staged with vLLM's in-place ``reload_weights`` (the model's ``load_weights``
maps HF names onto fused parameters, e.g. q/k/v into ``qkv_proj``, and the layer-wise reload
re-runs the CPU weight repacking), which must see every tensor of a fused layer at once.
"""

from __future__ import annotations

from typing import Iterable, Protocol

import torch

from rlmem.models.weight_buckets import Bucket, make_buckets


class WeightTransport(Protocol):
    def stage(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Move pairs to the workers (bucketed) without loading them; return how many."""
        ...

    def stage_bucket(self, bucket: Bucket) -> int:
        """Stage one ready bucket without copying it; return its parameter count."""
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


class RpcTransport:
    """Buckets through ``collective_rpc``; ``device``: where pairs are bucketed (the engine's device)."""

    def __init__(self, llm, bucket_bytes: int, device: str = "cpu"):
        self.llm, self.bucket_bytes, self.device = llm, bucket_bytes, device
        self.last_buckets = 0
        self.staged = 0

    def stage_bucket(self, bucket: Bucket) -> int:
        """Stage one ready bucket as it is (no copy: the worker keeps views into it until commit)."""
        expect_all(self.llm.collective_rpc("rlmem_stage_weights", args=(bucket,)), len(bucket.names), "received")
        self.last_buckets += 1
        self.staged += len(bucket.names)
        return len(bucket.names)

    def stage(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Send buckets to the workers without loading them yet (a reload must see every tensor of a layer)."""
        return sum(self.stage_bucket(b) for b in make_buckets(named, self.bucket_bytes, device=self.device))

    def commit(self) -> int:
        """Load everything staged, in place; returns the tensor count."""
        commit_staged(self.llm, self.staged)
        n, self.staged = self.staged, 0
        return n

    def send(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        self.last_buckets = 0
        self.stage(named)
        return self.commit()
