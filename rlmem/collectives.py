"""Every torch.distributed collective in rlmem goes through here, on the process group's device.

NCCL takes CUDA tensors only and gloo CPU tensors only, so a collective built from
``torch.tensor([...])`` (a CPU tensor) works in the CPU tests and fails on the first GPU run. These
helpers move the tensor to the group's device (:func:`backend_device`), run the collective and hand
the result back where the caller's tensor lives. ``tests/test_codebase.py`` checks that no module
calls a torch.distributed (or deepspeed.comm) collective except this one.

Without an initialised process group, or in a group of one, each helper is the identity.
``group`` is a group registered with torch.distributed (``None``: the default one);
``process_group`` a standalone ``ProcessGroup`` object built on its own store (as
:class:`rlmem.train.weight_sync.WeightGroup` does, so that it does not join the learners' group).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["backend_device", "group_device", "group_size", "all_reduce", "broadcast", "barrier", "COLLECTIVES",
           "OPTION_CLASSES"]

# The torch.distributed functions that move tensors between ranks or wait for them (the lint's list).
COLLECTIVES = frozenset({
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all", "all_to_all_single",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "gather",
    "gather_object", "scatter", "scatter_object_list", "barrier", "monitored_barrier", "send", "recv", "isend",
    "irecv", "batch_isend_irecv", "inference_all_reduce", "all_reduce_coalesced",
})
# The option classes of a ProcessGroup object's own collectives (``pg.broadcast([t], opts)``): using
# one means calling a collective on a standalone group, which goes through here too.
OPTION_CLASSES = frozenset({
    "AllToAllOptions", "AllreduceCoalescedOptions", "AllreduceOptions", "BarrierOptions", "BroadcastOptions",
    "GatherOptions", "ReduceOptions", "ReduceScatterOptions", "ScatterOptions", "AllgatherOptions",
})


def backend_device(backend: str, cuda_index: int | None = None) -> torch.device:
    """Where a backend's collectives take their tensors: NCCL the current CUDA device, others the CPU."""
    if str(backend).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device() if cuda_index is None else cuda_index)
    return torch.device("cpu")


def group_size(group=None, *, process_group=None) -> int:
    """Ranks in ``group`` (the default group when ``None``) or in a standalone ``process_group``;
    1 without an initialised process group."""
    import torch.distributed as dist

    if process_group is not None:
        return process_group.size()
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_device(group=None, *, process_group=None) -> torch.device:
    """The device ``group``'s (or a standalone ``process_group``'s) collectives need (:func:`backend_device`)."""
    import torch.distributed as dist

    if process_group is not None:
        return backend_device(process_group.name())
    return backend_device(dist.get_backend(group))


def _op(op: str):
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"all_reduce: op must be one of {sorted(ops)} (got {op!r})")
    return ops[op]


def all_reduce(values: torch.Tensor | Sequence[float], op: str = "sum", *, group=None,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Reduce ``values`` over ``group``; a new tensor on the caller's device (the CPU for a list).

    A list of floats becomes a ``dtype`` tensor (float64 by default: counts and metric sums stay exact).
    """
    t = values if isinstance(values, torch.Tensor) else torch.tensor(list(values), dtype=dtype)
    reduce_op = _op(op)
    if group_size(group) == 1:
        return t.clone()
    import torch.distributed as dist

    work = t.to(group_device(group), copy=True)
    dist.all_reduce(work, op=reduce_op, group=group)
    return work.to(t.device)


def broadcast(tensor: torch.Tensor, src: int, *, group=None, process_group=None) -> torch.Tensor:
    """Broadcast ``tensor`` from rank ``src`` (global rank; a standalone ``process_group``'s own rank)
    in place; returns ``tensor``. A standalone group's broadcast waits up to that group's timeout."""
    if group_size(group, process_group=process_group) == 1:
        return tensor
    import torch.distributed as dist

    dev = group_device(group, process_group=process_group)
    work = tensor if tensor.device == dev else tensor.to(dev)
    if process_group is not None:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        process_group.broadcast([work], opts).wait()
    else:
        dist.broadcast(work, src=src, group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def barrier(*, group=None) -> None:
    """Wait for every rank of ``group`` (NCCL: on this rank's CUDA device, so it cannot pick another)."""
    if group_size(group) == 1:
        return
    import torch.distributed as dist

    dev = group_device(group)
    if dev.type == "cuda":
        dist.barrier(group=group, device_ids=[dev.index])
    else:
        dist.barrier(group=group)
