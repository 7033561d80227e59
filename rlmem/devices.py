"""One device plan per actor: where a learner rank or a torch engine runs, decided in its own process.

Each actor works its device out from what *it* was given (Ray's GPU ids for this actor and its
``CUDA_VISIBLE_DEVICES``, and what torch in this process can see), never from the driver: a CPU-only
head node with GPU workers must still put the workers on their GPUs. :func:`plan_devices` is the
pure rule (every input an argument, unit-tested on CPU); :func:`current_plan` feeds it this
process's facts; :func:`apply_plan` makes DeepSpeed and torch follow it.

The rule:

* **Which GPU.** Inside a Ray actor, Ray's assignment decides: no GPU ids means the CPU (even on a
  GPU node); otherwise the actor's first assigned GPU, at its index among the devices this process
  sees (``CUDA_VISIBLE_DEVICES``, which Ray narrows to the assignment, so usually ``cuda:0``; two
  actors sharing one GPU at 0.5 each both get ``cuda:0``). That index is the **local rank**
  DeepSpeed is given (``LOCAL_RANK``), never the global rank: rank 1 sees one GPU, ``cuda:0``.
  Outside Ray (tests, single-process runs, ``rlmem doctor``) the process uses ``cuda:<local_rank>``
  when torch sees CUDA, unless ``DS_ACCELERATOR=cpu`` asks for the CPU.
* **Accelerator and backend.** CUDA: DeepSpeed's ``cuda`` accelerator and NCCL; CPU: ``cpu`` and gloo.
* **Dtype.** The configured dtype, unchanged (no silent up- or down-cast): ``bfloat16`` on CUDA when
  the config says so (refused on a GPU without bf16), ``float32`` and ``float64`` anywhere (float64
  is for parity checks), ``float16`` on CUDA only (refused on the CPU, where rlmem's engines and
  learner do not run it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Sequence

from rlmem.dtypes import canonical

__all__ = ["DevicePlan", "DevicePlanError", "plan_devices", "current_plan", "apply_plan"]


class DevicePlanError(ValueError):
    """This actor cannot run as configured here (one line: what it was given and what it needs)."""


@dataclass(frozen=True)
class DevicePlan:
    """Where one actor runs. ``device`` is a torch device string (``"cpu"`` or ``"cuda:<local_rank>"``)."""

    device: str
    local_rank: int                       # index into this process's visible devices (DeepSpeed's LOCAL_RANK)
    accelerator: Literal["cuda", "cpu"]   # DeepSpeed's accelerator (DS_ACCELERATOR)
    backend: Literal["nccl", "gloo"]      # torch.distributed process-group backend
    dtype: str                            # canonical name (rlmem.dtypes) the engine / learner runs in
    gpu_ids: tuple[str, ...] = ()         # what Ray assigned (empty: none, or not in Ray), for reports

    @property
    def is_cuda(self) -> bool:
        return self.accelerator == "cuda"

    def torch_device(self):
        import torch

        return torch.device(self.device)

    def describe(self) -> str:
        ray = f", Ray GPU ids {list(self.gpu_ids)}" if self.gpu_ids else ""
        return f"{self.device} ({self.dtype}, DeepSpeed {self.accelerator}, {self.backend}{ray})"


def _visible(visible_devices: str | None, device_count: int) -> list[str]:
    """The device ids this process sees, in torch's order (``CUDA_VISIBLE_DEVICES`` unset: all of them)."""
    if visible_devices is None:
        return [str(i) for i in range(device_count)]
    return [v.strip() for v in visible_devices.split(",") if v.strip()]


def plan_devices(*, dtype: str, gpu_ids: Sequence[int | str] | None, visible_devices: str | None,
                 device_count: int, local_rank: int | None = None, prefer_cpu: bool = False,
                 bf16_supported: bool = True, what: str = "actor") -> DevicePlan:
    """The device plan of one actor (module docstring), from facts passed in.

    ``gpu_ids``: ``ray.get_gpu_ids()`` inside a Ray actor, ``None`` outside Ray. ``visible_devices``:
    this process's ``CUDA_VISIBLE_DEVICES`` (``None`` if unset). ``device_count``: what torch sees
    here (0 without CUDA). ``local_rank``: outside Ray, which visible GPU (default 0). ``prefer_cpu``:
    outside Ray, run on the CPU even where CUDA exists. ``what`` names the actor in errors.
    """
    name = canonical(dtype, what=f"{what} dtype")
    if gpu_ids is None:                        # not a Ray actor: this process's own devices
        if prefer_cpu or device_count == 0:
            index = None
        else:
            index = 0 if local_rank is None else int(local_rank)
            if not 0 <= index < device_count:
                raise DevicePlanError(f"{what}: local rank {index} asks for cuda:{index}, but this process sees "
                                      f"{device_count} CUDA device(s)")
        ids: tuple[str, ...] = ()
    elif not gpu_ids:                          # Ray gave this actor no GPU: the CPU, even on a GPU node
        index, ids = None, ()
    else:
        ids = tuple(str(g) for g in gpu_ids)
        if device_count == 0:
            raise DevicePlanError(f"{what}: Ray assigned GPU(s) {list(ids)}, but torch here sees no CUDA device "
                                  f"(a CPU-only torch build on a GPU node?)")
        visible = _visible(visible_devices, device_count)
        first = next((g for g in visible if g in ids), None)
        if first is None:
            raise DevicePlanError(f"{what}: Ray assigned GPU(s) {list(ids)}, none of them among this process's "
                                  f"CUDA_VISIBLE_DEVICES={visible_devices!r}")
        index = visible.index(first)
        if index >= device_count:
            raise DevicePlanError(f"{what}: GPU {first} is visible device {index}, but torch sees only "
                                  f"{device_count} CUDA device(s)")
    if index is None:
        if name == "float16":
            raise DevicePlanError(f"{what}: dtype float16 runs on CUDA only; on the CPU use float32 or bfloat16")
        return DevicePlan("cpu", 0, "cpu", "gloo", name, ids)
    if name == "bfloat16" and not bf16_supported:
        raise DevicePlanError(f"{what}: dtype bfloat16 is not supported by GPU cuda:{index}; use float32 "
                              f"(or float16 for vLLM rollouts)")
    return DevicePlan(f"cuda:{index}", index, "cuda", "nccl", name, ids)


def _ray_gpu_ids() -> list[str] | None:
    """``ray.get_gpu_ids()`` inside a Ray actor; ``None`` in a driver or without Ray."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    return [str(g) for g in ray.get_gpu_ids()]


def current_plan(dtype: str, *, local_rank: int | None = None, what: str = "actor") -> DevicePlan:
    """This process's plan: :func:`plan_devices` on Ray's assignment, ``CUDA_VISIBLE_DEVICES`` and torch.

    Call it inside the actor (never in the driver). Outside Ray, ``DS_ACCELERATOR=cpu`` keeps the
    process on the CPU (the test suite sets it); inside a Ray actor the assignment wins. bfloat16
    counts as supported on GPUs with native bf16 (compute capability 8.0, Ampere, and later).
    """
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    bf16 = all(torch.cuda.get_device_capability(i)[0] >= 8 for i in range(count))
    return plan_devices(dtype=dtype, gpu_ids=_ray_gpu_ids(), visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                        device_count=count, local_rank=local_rank,
                        prefer_cpu=os.environ.get("DS_ACCELERATOR") == "cpu", bf16_supported=bf16, what=what)


def apply_plan(plan: DevicePlan) -> None:
    """Make this process follow ``plan``: DeepSpeed's accelerator (before DeepSpeed is imported) and
    torch's current CUDA device. DeepSpeed fixes its accelerator when first imported, so a process
    that already imported it with the other one is refused (one line) rather than half-switched."""
    import sys

    if "deepspeed" in sys.modules:
        from deepspeed.accelerator import get_accelerator

        have = get_accelerator().device_name()
        if have != plan.accelerator:
            raise DevicePlanError(f"DeepSpeed already runs on {have!r} in this process, but its device plan is "
                                  f"{plan.describe()}: set DS_ACCELERATOR before DeepSpeed is imported")
    os.environ["DS_ACCELERATOR"] = plan.accelerator
    if plan.is_cuda:
        import torch

        torch.cuda.set_device(plan.local_rank)
