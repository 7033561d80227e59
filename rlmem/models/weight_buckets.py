"""Weight buckets: named parameters flattened into a few contiguous tensors, one dtype each.

Every weight transport uses this one packing: the learner's sync through the Ray object store
(:mod:`rlmem.train.weight_sync`), vLLM's CPU RPC staging and its CUDA IPC handles
(:mod:`rlmem.engine.vllm.weights`). One dtype per bucket keeps the flat tensor exact; a few big
transfers instead of thousands of tiny ones is what makes a sync fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch


@dataclass
class Bucket:
    """Several parameters of one dtype, flattened into one contiguous 1-D tensor."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    flat: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


def make_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                 device: str | torch.device = "cpu") -> Iterator[Bucket]:
    """Group ``(name, tensor)`` pairs, in order, into buckets of at most ``bucket_bytes`` per dtype.

    A tensor larger than ``bucket_bytes`` gets a bucket of its own. The flat tensor is a new tensor on
    ``device`` (CPU for the Ray object store and RPC; the GPU for CUDA IPC), so the caller may keep
    training after a bucket is yielded. Streaming: at most one open bucket per
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
        t = t.detach().to(device)
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
