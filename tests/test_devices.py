"""The device plan (rlmem/devices.py) over the placements of issue 21, and the collectives helper
(rlmem/collectives.py) on real gloo process groups. The CUDA answers are worked out from the facts
a GPU actor would see (Ray's ids, CUDA_VISIBLE_DEVICES, torch's device count), passed in."""

from __future__ import annotations

import os

import pytest
import torch

from rlmem import collectives
from rlmem.devices import DevicePlan, DevicePlanError, apply_plan, current_plan, plan_devices
from rlmem.ports import free_port


def plan(**kw) -> DevicePlan:
    base = dict(dtype="float32", gpu_ids=None, visible_devices=None, device_count=0)
    base.update(kw)
    return plan_devices(**base)


def test_no_gpu():
    p = plan()
    assert (p.device, p.local_rank, p.accelerator, p.backend, p.dtype) == ("cpu", 0, "cpu", "gloo", "float32")
    # a Ray actor given no GPU runs on the CPU even on a GPU node
    p = plan(gpu_ids=[], visible_devices="", device_count=0)
    assert (p.device, p.accelerator, p.backend) == ("cpu", "cpu", "gloo")
    p = plan(gpu_ids=[], visible_devices=None, device_count=8)
    assert (p.device, p.accelerator, p.backend) == ("cpu", "cpu", "gloo")


def test_one_gpu_per_actor_uses_the_local_index_not_the_global_rank():
    # Ray gives learner rank r GPU r and narrows CUDA_VISIBLE_DEVICES to it: every rank sees cuda:0
    for rank in range(4):
        p = plan(gpu_ids=[rank], visible_devices=str(rank), device_count=1, dtype="bf16")
        assert (p.device, p.local_rank, p.accelerator, p.backend) == ("cuda:0", 0, "cuda", "nccl")
        assert p.dtype == "bfloat16" and p.gpu_ids == (str(rank),)


def test_two_actors_sharing_one_gpu_at_half_each():
    plans = [plan(gpu_ids=["0"], visible_devices="0", device_count=1, dtype="bfloat16") for _ in range(2)]
    assert [p.device for p in plans] == ["cuda:0", "cuda:0"]
    assert all(p.backend == "nccl" and p.accelerator == "cuda" for p in plans)


def test_several_gpus_on_one_node():
    # Ray's default (visible devices narrowed to the assignment)
    assert plan(gpu_ids=["6"], visible_devices="6", device_count=1).device == "cuda:0"
    # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: the process sees all 8; GPU 3 is cuda:3
    p = plan(gpu_ids=[3], visible_devices=None, device_count=8)
    assert (p.device, p.local_rank) == ("cuda:3", 3)
    # the node itself was narrowed to 4..7: Ray's id "6" is the process's third device
    assert plan(gpu_ids=["6"], visible_devices="4,5,6,7", device_count=4).device == "cuda:2"
    # an actor holding two GPUs runs the torch engine / learner on the first visible one
    assert plan(gpu_ids=["5", "2"], visible_devices="2,5", device_count=2).device == "cuda:0"
    # GPU UUIDs work the same way
    assert plan(gpu_ids=["GPU-b"], visible_devices="GPU-a,GPU-b", device_count=2).device == "cuda:1"
    # outside Ray (a test, rlmem doctor): cuda:<local_rank>
    assert plan(device_count=4, local_rank=2).device == "cuda:2"
    with pytest.raises(DevicePlanError, match="local rank 4 asks for cuda:4, but this process sees 4"):
        plan(device_count=4, local_rank=4)


def test_cpu_only_head_with_gpu_workers():
    """The head (this machine: no CUDA) sets nothing about devices; a worker's plan follows its own
    assignment, whatever DS_ACCELERATOR it inherited."""
    from rlmem.train.workers import actor_env

    assert not torch.cuda.is_available()
    assert "DS_ACCELERATOR" not in actor_env()
    p = plan(gpu_ids=["1"], visible_devices="1", device_count=1, prefer_cpu=True)
    assert (p.device, p.accelerator, p.backend) == ("cuda:0", "cuda", "nccl")
    # outside Ray, DS_ACCELERATOR=cpu (prefer_cpu) keeps a GPU machine's process on the CPU
    assert plan(device_count=2, prefer_cpu=True).device == "cpu"


def test_mismatches_are_refused_in_one_line():
    with pytest.raises(DevicePlanError, match=r"Ray assigned GPU\(s\) \['0'\], but torch here sees no CUDA"):
        plan(gpu_ids=["0"], visible_devices="0", device_count=0, what="learner worker 0")
    with pytest.raises(DevicePlanError, match=r"none of them among this process's CUDA_VISIBLE_DEVICES='1,2'"):
        plan(gpu_ids=["3"], visible_devices="1,2", device_count=2)


def test_dtype_rule():
    assert plan(dtype="fp64").dtype == "float64"
    assert plan(dtype="float64", gpu_ids=["0"], visible_devices="0", device_count=1).dtype == "float64"
    assert plan(dtype="bf16").dtype == "bfloat16"            # bf16 runs on the CPU too (slowly)
    assert plan(dtype="float16", gpu_ids=["0"], visible_devices="0", device_count=1).dtype == "float16"
    with pytest.raises(DevicePlanError, match="rollout worker 1: dtype float16 runs on CUDA only"):
        plan(dtype="float16", what="rollout worker 1")
    with pytest.raises(DevicePlanError, match="bfloat16 is not supported by GPU cuda:0"):
        plan(dtype="bfloat16", gpu_ids=["0"], visible_devices="0", device_count=1, bf16_supported=False)
    with pytest.raises(ValueError, match=r"learner rank 0 dtype: must be one of .*'int8'"):
        plan(dtype="int8", what="learner rank 0")


def test_this_process_plan_and_deepspeed_refusal(monkeypatch):
    """Here (no Ray, no CUDA): the CPU. A process whose DeepSpeed was imported on the CPU refuses a
    CUDA plan instead of half-switching, and leaves DS_ACCELERATOR alone."""
    import deepspeed  # noqa: F401  (the test suite runs DeepSpeed on the CPU: tests/conftest.py)

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    p = current_plan("float32")
    assert (p.device, p.accelerator, p.backend, p.gpu_ids) == ("cpu", "cpu", "gloo", ())
    apply_plan(p)
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    cuda = DevicePlan("cuda:0", 0, "cuda", "nccl", "float32", ("0",))
    with pytest.raises(DevicePlanError, match="DeepSpeed already runs on 'cpu' in this process"):
        apply_plan(cuda)
    assert os.environ["DS_ACCELERATOR"] == "cpu"


class _PlanProbe:
    """A Ray actor reporting what Ray gave it and what this process's plan says."""

    def facts(self):
        from rlmem.devices import current_plan

        import ray

        try:
            p = current_plan("float32", what="probe").device
        except DevicePlanError as e:
            p = str(e)
        return [str(g) for g in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES"), p


@pytest.mark.slow
def test_ray_assignments_feed_the_plan():
    """Real Ray (with 2 logical GPUs and no CUDA): two actors at 0.5 GPU share one id, an actor at
    1 GPU gets the other; on a 1-GPU-per-process view each plan is cuda:0. With no CUDA in this
    torch the actor's own plan says so in one line; an actor without GPUs plans the CPU."""
    import ray

    path = {"PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, logging_level="error", runtime_env={"env_vars": path})
    try:
        Probe = ray.remote(_PlanProbe)
        half = [Probe.options(num_gpus=0.5, num_cpus=0).remote() for _ in range(2)]
        whole = Probe.options(num_gpus=1, num_cpus=0).remote()
        # inherits DS_ACCELERATOR=cuda (a GPU head's environment): no GPU from Ray still means the CPU
        none = Probe.options(num_gpus=0, num_cpus=0,
                             runtime_env={"env_vars": {**path, "DS_ACCELERATOR": "cuda"}}).remote()
        (ids_a, vis_a, own_a), (ids_b, vis_b, _), (ids_c, vis_c, _), (ids_n, _, own_n) = ray.get(
            [a.facts.remote() for a in half] + [whole.facts.remote(), none.facts.remote()])
    finally:
        ray.shutdown()
    assert ids_a == ids_b and len(ids_a) == 1 and vis_a == vis_b == ids_a[0]
    assert len(ids_c) == 1 and ids_c != ids_a and vis_c == ids_c[0]
    assert ids_n == [] and own_n == "cpu"
    assert own_a == f"probe: Ray assigned GPU(s) {ids_a}, but torch here sees no CUDA device " \
                    "(a CPU-only torch build on a GPU node?)"
    for ids, vis in ((ids_a, vis_a), (ids_b, vis_b), (ids_c, vis_c)):
        assert plan(gpu_ids=ids, visible_devices=vis, device_count=1).device == "cuda:0"


def _torch_rollout_worker(model_dir, monkeypatch):
    from rlmem.engine.sampling import SamplingParams
    from rlmem.train.actors import RolloutWorker

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)   # outside Ray: what this process sees decides
    w = RolloutWorker(str(model_dir), backend="torch", dtype="float32", seed=0)
    records, stats = w.generate([[5, 6, 7, 8, 9]] * 2, SamplingParams(temperature=1.0, max_new_tokens=6), [None, None])
    assert [len(r.completion_ids) for r in records] == [6, 6] and stats["new_tokens"] == 12
    return w


def test_the_torch_engine_is_built_on_the_rollout_workers_device(tiny_model_dir, monkeypatch):
    w = _torch_rollout_worker(tiny_model_dir, monkeypatch)
    assert w.device_plan.device == "cpu" and w.device_plan.dtype == "float32"
    assert {p.device for p in w.engine.model.parameters()} == {torch.device("cpu")}


@pytest.mark.gpu
def test_the_torch_engine_runs_on_the_gpu(tiny_model_dir, monkeypatch):
    w = _torch_rollout_worker(tiny_model_dir, monkeypatch)
    assert w.device_plan.device == "cuda:0"
    assert {p.device for p in w.engine.model.parameters()} == {torch.device("cuda", 0)}


# ---------------------------------------------------------------------------------------------
# Collectives


def test_backend_device():
    assert collectives.backend_device("gloo") == torch.device("cpu")
    assert collectives.backend_device("NCCL", cuda_index=3) == torch.device("cuda", 3)
    assert collectives.backend_device("nccl", cuda_index=0).type == "cuda"


def test_without_a_process_group_the_helpers_are_the_identity():
    import torch.distributed as dist

    assert not dist.is_initialized()
    out = collectives.all_reduce([1.5, 2.0], "max")
    assert out.dtype == torch.float64 and out.tolist() == [1.5, 2.0]
    t = torch.arange(3.0)
    assert collectives.broadcast(t, src=0) is t
    collectives.barrier()
    with pytest.raises(ValueError, match=r"all_reduce: op must be one of \['max', 'min', 'sum'\] \(got 'mean'\)"):
        collectives.all_reduce(torch.zeros(1), "mean")


def _collectives_worker(rank: int, world: int, port: int, port2: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        assert collectives.group_size() == world and collectives.group_device() == torch.device("cpu")
        s = collectives.all_reduce([rank + 1.0, 10.0 * rank])
        m = collectives.all_reduce([float(rank), -float(rank)], "max")
        own = torch.tensor([rank], dtype=torch.int64)
        t = collectives.all_reduce(own)
        b = torch.full((4,), float(rank), dtype=torch.bfloat16)
        collectives.broadcast(b, src=1)
        collectives.barrier()
        # a standalone group on its own store (how the weight-sync group is built), ranks reversed
        store = dist.TCPStore("127.0.0.1", port2, world, rank == 0, timeout=datetime.timedelta(seconds=60))
        pg = dist.ProcessGroupGloo(store, world - 1 - rank, world, datetime.timedelta(seconds=60))
        assert collectives.group_size(process_group=pg) == world
        assert collectives.group_device(process_group=pg) == torch.device("cpu")
        w = torch.arange(5, dtype=torch.float32) * (rank + 1)
        collectives.broadcast(w, src=0, process_group=pg)      # pg rank 0 is global rank 1
        torch.save({"sum": s, "max": m, "int": t, "own": own, "bcast": b, "pg": w}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_collectives_on_a_gloo_group(tmp_path):
    torch.multiprocessing.spawn(_collectives_worker, args=(2, free_port(), free_port(), str(tmp_path)), nprocs=2,
                                join=True)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["sum"].dtype == torch.float64 and r["sum"].tolist() == [3.0, 10.0]
        assert r["max"].tolist() == [1.0, 0.0]
        assert r["int"].dtype == torch.int64 and r["int"].tolist() == [1]
        assert r["own"].tolist() == [rank]            # all_reduce returns a new tensor
        assert r["bcast"].dtype == torch.bfloat16 and r["bcast"].tolist() == [1.0] * 4
        assert r["pg"].tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]
