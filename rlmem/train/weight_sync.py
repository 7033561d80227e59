"""Bucketed weight sync, learner -> rollout workers, through the Ray object store.

Peers send one parameter at a time (thousands of tiny transfers) or one giant blob, and a stuck
receiver hangs the run forever. Here parameters are flattened into buckets of about
``ray.weight_sync_bucket_mb`` (one dtype per bucket, so the flat tensor is exact), learner rank 0
puts each bucket into the object store once, every rollout worker pulls and unpacks it, and the
driver waits with a deadline: a timeout raises :class:`WeightSyncError` naming the workers that
did not answer. Every worker reports how many parameters it loaded, so a silently skipped bucket
is an error too.

The packing logic (:func:`make_buckets`, :func:`unpack_bucket`) is device-independent and
unit-tested on CPU; a CUDA/NCCL transport would reuse it unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch


class WeightSyncError(RuntimeError):
    """A weight sync that timed out or did not load every parameter; names the worker(s)."""


@dataclass
class Bucket:
    """Several parameters of one dtype, flattened into one contiguous 1-D tensor."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    flat: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


def make_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Group ``(name, tensor)`` pairs, in order, into buckets of at most ``bucket_bytes`` per dtype.

    A tensor larger than ``bucket_bytes`` gets a bucket of its own. Tensors are copied (to CPU), so
    the caller may keep training after a bucket is yielded. Streaming: at most one open bucket per
    dtype is held in memory.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1 (got {bucket_bytes})")
    open_: dict[torch.dtype, tuple[list[str], list[torch.Tensor], int]] = {}

    def close(dtype: torch.dtype) -> Bucket:
        names, tensors, _ = open_.pop(dtype)
        flat = torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.empty(0, dtype=dtype)
        return Bucket(names, [tuple(t.shape) for t in tensors], flat)

    for name, t in named_tensors:
        t = t.detach().to("cpu")
        size = t.numel() * t.element_size()
        names, tensors, used = open_.get(t.dtype, ([], [], 0))
        if tensors and used + size > bucket_bytes:
            yield close(t.dtype)
            names, tensors, used = [], [], 0
        names.append(name)
        tensors.append(t)
        open_[t.dtype] = (names, tensors, used + size)
    for dtype in list(open_):
        yield close(dtype)


def unpack_bucket(bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
    """The ``(name, tensor)`` pairs of ``bucket`` (views into ``bucket.flat``, no copy)."""
    out, offset = [], 0
    for name, shape in zip(bucket.names, bucket.shapes):
        n = 1
        for s in shape:
            n *= s
        out.append((name, bucket.flat[offset:offset + n].view(shape)))
        offset += n
    if offset != bucket.flat.numel():
        raise ValueError(f"weight sync: bucket of {bucket.flat.numel()} elements holds {offset} for its "
                         f"{len(bucket.names)} parameters")
    return out


def sync_weights(learners: Sequence[Any], rollout_workers: Sequence[Any], *, bucket_mb: float,
                 timeout_s: float, worker_names: Sequence[str] | None = None) -> dict[str, float]:
    """Send the learner's weights to every rollout worker; return ``{time/sync, sync/bytes, sync/buckets}``.

    ``learners`` are LearnerWorker actors (all ranks take part: gathering is collective under
    ZeRO 3; rank 0 publishes the bucket refs), ``rollout_workers`` RolloutWorker actors.
    """
    import ray
    from ray.exceptions import GetTimeoutError

    t0 = time.perf_counter()
    deadline = t0 + timeout_s
    names = list(worker_names) if worker_names else [f"rollout worker {i}" for i in range(len(rollout_workers))]
    pub = [lw.publish_weights.remote(int(bucket_mb * 2**20)) for lw in learners]
    try:
        published = ray.get(pub, timeout=timeout_s)
    except GetTimeoutError:
        raise WeightSyncError(f"weight sync timed out after {timeout_s:.0f}s (ray.weight_sync_timeout_s) while "
                              f"the learner workers gathered and published their weights") from None
    refs, expected, nbytes = published[0]
    pending = {}
    for name, w in zip(names, rollout_workers):
        # One call per bucket: Ray resolves each ref in the worker, buckets stream one after the other.
        pending[name] = [w.update_weights.remote(ref) for ref in refs]
    loaded: dict[str, int] = {}
    for name, calls in pending.items():
        left = max(0.0, deadline - time.perf_counter())
        try:
            loaded[name] = sum(ray.get(calls, timeout=left))
        except GetTimeoutError:
            stuck = [n for n, c in pending.items() if n not in loaded]
            raise WeightSyncError(f"weight sync timed out after {timeout_s:.0f}s (ray.weight_sync_timeout_s): "
                                  f"{', '.join(stuck)} did not finish loading {len(refs)} buckets "
                                  f"({nbytes / 2**20:.1f} MiB)") from None
    for name, n in loaded.items():
        if n != expected:
            raise WeightSyncError(f"weight sync: {name} loaded {n} parameters, the learner sent {expected}")
    # Engines that stage buckets (vLLM: an in-place reload must see whole fused layers) load them now.
    finish = {name: w.finish_weight_update.remote() for name, w in zip(names, rollout_workers)}
    for name, ref in finish.items():
        try:
            ray.get(ref, timeout=max(0.0, deadline - time.perf_counter()))
        except GetTimeoutError:
            raise WeightSyncError(f"weight sync timed out after {timeout_s:.0f}s (ray.weight_sync_timeout_s): "
                                  f"{name} did not finish loading the staged weights") from None
    return {"time/sync": time.perf_counter() - t0, "sync/bytes": float(nbytes), "sync/buckets": float(len(refs))}
