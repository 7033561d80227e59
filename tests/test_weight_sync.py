"""Weight-sync bucketing (device-independent) and the timeout error, on CPU."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from rlmem.models.weight_buckets import Bucket, make_buckets, unpack_bucket
from rlmem.train.weight_sync import WeightSyncError


def _named():
    g = torch.Generator().manual_seed(0)
    return [("a.weight", torch.randn(4, 8, generator=g)),            # 128 B
            ("b.bias", torch.randn(8, generator=g)),                 # 32 B
            ("c.half", torch.randn(3, 5, generator=g).to(torch.bfloat16)),
            ("d.big", torch.randn(64, generator=g)),                 # 256 B > bucket: alone
            ("e.scalar", torch.tensor(3.5)),
            ("f.weight", torch.randn(2, 3, 4, generator=g))]


def test_round_trip_small_buckets_keeps_names_shapes_dtypes_and_values():
    named = _named()
    buckets = list(make_buckets(named, bucket_bytes=160))
    assert all(len({b.flat.dtype}) == 1 for b in buckets)
    # fp32: [a, b] = 160 B, [d] alone (> 160 B), [e, f]; bf16: [c]; open buckets flush at the end
    assert [b.names for b in buckets] == [["a.weight", "b.bias"], ["d.big"], ["c.half"], ["e.scalar", "f.weight"]]
    got = dict(p for b in buckets for p in unpack_bucket(b))
    assert list(got) != [] and set(got) == {n for n, _ in named}
    for name, t in named:
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name], t)


def test_one_big_bucket_and_copy_semantics():
    named = _named()
    buckets = list(make_buckets(named, bucket_bytes=2**20))
    assert [len(b.names) for b in buckets] == [5, 1]
    assert buckets[0].nbytes == 4 * (32 + 8 + 64 + 1 + 24)
    named[0][1].add_(1.0)   # the learner keeps training: the bucket holds a copy
    assert not torch.equal(dict(unpack_bucket(buckets[0]))["a.weight"], named[0][1])


def test_unpack_rejects_a_bucket_whose_sizes_do_not_add_up():
    b = Bucket(["x"], [(2, 2)], torch.zeros(5))
    with pytest.raises(ValueError, match="5 elements holds 4"):
        unpack_bucket(b)
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(make_buckets(_named(), 0))


class _Learner:
    def publish_weights(self, bucket_bytes):
        import ray

        bs = list(make_buckets(_named(), bucket_bytes))
        return [ray.put(b) for b in bs], sum(len(b.names) for b in bs), sum(b.nbytes for b in bs)


class _Rollout:
    def __init__(self, delay: float):
        self.delay, self.loaded = delay, {}

    def update_weights(self, bucket):
        time.sleep(self.delay)
        self.loaded.update(dict(unpack_bucket(bucket)))
        return len(bucket.names)

    def finish_weight_update(self):   # RolloutWorker's end-of-update call (vLLM loads staged buckets here)
        return 0

    def get(self, name):
        return self.loaded[name]


@pytest.mark.slow
def test_sync_through_ray_and_timeout_names_the_stuck_worker():
    ray = pytest.importorskip("ray")
    from rlmem.train.weight_sync import sync_weights

    here = str(Path(__file__).parent)   # the actors below are defined in this test module
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error",
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}})
    try:
        learner = ray.remote(_Learner).remote()
        fast, slow = ray.remote(_Rollout).remote(0.0), ray.remote(_Rollout).remote(5.0)
        m = sync_weights([learner], [fast], bucket_mb=1e-4, timeout_s=30, worker_names=["rollout worker 0"])
        assert m["sync/buckets"] == 5 and m["sync/bytes"] == 4 * 129 + 2 * 15 and m["time/sync"] > 0
        assert torch.equal(ray.get(fast.get.remote("d.big")), dict(_named())["d.big"])
        with pytest.raises(WeightSyncError, match=r"rollout worker 1 did not finish loading 5 buckets"):
            sync_weights([learner], [fast, slow], bucket_mb=1e-4, timeout_s=2,
                         worker_names=["rollout worker 0", "rollout worker 1"])
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------- GPU paths, on CPU
RECEIVERS = ["rollout worker 0", "rollout worker 1"]


def test_held_buckets_live_until_every_receiver_acknowledged():
    import gc
    import weakref

    from rlmem.train.weight_sync import BucketPublisher

    pub = BucketPublisher()
    shared = []
    sid, metas, count, nbytes = pub.publish(_named(), 160, "cpu", RECEIVERS,
                                            share=lambda t: shared.append(t) or ("handle", len(shared) - 1))
    assert (sid, count, nbytes) == (1, 6, 4 * 129 + 2 * 15)
    assert [m.names for m in metas] == [["a.weight", "b.bias"], ["d.big"], ["c.half"], ["e.scalar", "f.weight"]]
    assert [m.dtype for m in metas] == ["float32", "float32", "bfloat16", "float32"]
    assert [m.handle for m in metas] == [("handle", i) for i in range(4)] and metas[3].shapes == [(), (2, 3, 4)]
    alive = [weakref.ref(t) for t in shared]
    shared.clear()
    gc.collect()
    assert all(r() is not None for r in alive)          # the holder keeps them
    assert pub.ack(sid, ["rollout worker 1"]) is False   # one of two: still held
    gc.collect()
    assert all(r() is not None for r in alive) and pub.held[sid].missing == ["rollout worker 0"]
    with pytest.raises(WeightSyncError, match="rollout worker 7 acknowledged but is not one of its receivers"):
        pub.ack(sid, ["rollout worker 7"])
    assert pub.ack(sid, ["rollout worker 0"]) is True
    gc.collect()
    assert pub.held == {} and all(r() is None for r in alive)
    # a second sync released early (a timeout) names who had not acknowledged
    sid2, *_ = pub.publish(_named(), 160, "cpu", RECEIVERS)
    pub.ack(sid2, ["rollout worker 0"])
    assert sid2 == 2 and pub.release(sid2) == ["rollout worker 1"] and pub.held == {}
    with pytest.raises(WeightSyncError, match="already released"):
        pub.flats(sid2)


def test_sync_path_choice():
    from rlmem.train.weight_sync import choose_path

    assert choose_path("auto", placement="colocated", learner_on_cuda=False) == "object_store"
    assert choose_path("auto", placement="split", learner_on_cuda=False) == "object_store"
    assert choose_path("auto", placement="colocated", learner_on_cuda=True) == "cuda_ipc"
    assert choose_path("auto", placement="split", learner_on_cuda=True) == "broadcast"
    assert choose_path("broadcast", placement="colocated", learner_on_cuda=False) == "broadcast"
    with pytest.raises(ValueError, match="ray.weight_sync must be auto or one of"):
        choose_path("nccl", placement="split", learner_on_cuda=True)


class _StubLearner:
    """The part of rlmem.learner.learner.Learner the weight sync uses, over a plain HF model."""

    def __init__(self, model):
        self.policy = model

    def named_parameters_for_sync(self):
        for name, p in self.policy.named_parameters():
            yield name, p.detach()


def _perturbed(model_dir: str, seed: int):
    from rlmem.models.loading import load_model

    model = load_model(model_dir, "float32")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


def _sync_learner_class():
    from rlmem.train.actors import LearnerWorker

    class SyncLearner(LearnerWorker):
        """LearnerWorker's real weight-sync methods over a stub learner (no DeepSpeed)."""

        def __init__(self, model_dir: str, seed: int = 0, fake_ipc: bool = False, device: str = "cpu"):
            self.rank, self.world_size = 0, 1
            self.publisher = self.weight_group = None
            self.learner = _StubLearner(_perturbed(model_dir, seed).to(device))
            self.fake_ipc = fake_ipc

        def publish_weights_shared(self, bucket_bytes, path, receivers):
            if not self.fake_ipc:
                return super().publish_weights_shared(bucket_bytes, path, receivers)
            # CPU stand-in for CUDA IPC: the handle names the bucket; the holder logic is the real one
            from rlmem.train.weight_sync import BucketPublisher

            self.publisher = self.publisher or BucketPublisher()
            return self.publisher.publish(self.learner.named_parameters_for_sync(), bucket_bytes, "cpu", receivers,
                                          share=lambda t: ("cpu-handle", t.numel()))

        def held(self) -> list[int]:
            return sorted(self.publisher.held) if self.publisher else []

        def weights(self):
            return {k: v.cpu().clone() for k, v in self.learner.named_parameters_for_sync()}

    return SyncLearner


class _IpcRollout:
    """Receives handles; while loading asks the learner what it holds (the buckets must be held)."""

    def __init__(self, learner, delay: float):
        self.learner, self.delay, self.seen = learner, delay, []

    def receive_weights_ipc(self, metas):
        import ray

        self.seen.append(ray.get(self.learner.held.remote()))
        time.sleep(self.delay)
        return sum(len(m.names) for m in metas)

    def finish_weight_update(self):
        return 0

    def held_while_loading(self):
        return self.seen


def _ray_with_this_dir(num_gpus: int = 0):
    ray = pytest.importorskip("ray")
    here = str(Path(__file__).parent)
    env = {"PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    if not num_gpus:
        env["DS_ACCELERATOR"] = "cpu"
    ray.init(num_cpus=4, num_gpus=num_gpus, include_dashboard=False, logging_level="error",
             runtime_env={"env_vars": env})
    return ray


@pytest.mark.slow
def test_ipc_path_holds_buckets_until_acknowledged_and_a_timeout_releases_them(tiny_model_dir):
    from rlmem.train.weight_sync import sync_weights

    ray = _ray_with_this_dir()
    try:
        learner = ray.remote(_sync_learner_class()).remote(str(tiny_model_dir), fake_ipc=True)
        fast = [ray.remote(_IpcRollout).remote(learner, 0.0) for _ in range(2)]
        slow = ray.remote(_IpcRollout).remote(learner, 8.0)
        ray.get([w.held_while_loading.remote() for w in fast + [slow]])   # started (as the driver's are)
        m = sync_weights([learner], fast, bucket_mb=0.25, timeout_s=30, worker_names=RECEIVERS, path="cuda_ipc")
        assert m["sync/buckets"] > 1 and m["time/sync"] > 0
        assert ray.get([w.held_while_loading.remote() for w in fast]) == [[[1]], [[1]]]
        assert ray.get(learner.held.remote()) == []            # released after both acknowledged
        with pytest.raises(WeightSyncError, match=r"\(cuda_ipc\) timed out after 2s .*: rollout worker 1 did not "
                                                  r"finish loading"):
            sync_weights([learner], [fast[0], slow], bucket_mb=0.25, timeout_s=2, worker_names=RECEIVERS,
                         path="cuda_ipc")
        assert ray.get(learner.held.remote()) == []            # the timeout released sync 2
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_broadcast_path_over_gloo_gives_every_engine_the_learner_weights(tiny_model_dir):
    from rlmem.train.actors import RolloutWorker, remote_class
    from rlmem.train.weight_sync import setup_weight_group, sync_weights

    ray = _ray_with_this_dir()
    try:
        learner = ray.remote(_sync_learner_class()).remote(str(tiny_model_dir), seed=3)
        rollout = [remote_class(RolloutWorker).remote(str(tiny_model_dir), backend="torch", dtype="float32", index=i,
                                                      num_threads=1) for i in range(2)]
        ray.get([w.ping.remote() for w in rollout])
        want = ray.get(learner.weights.remote())
        before = ray.get(rollout[0].state_dict.remote())
        assert not torch.equal(before["model.embed_tokens.weight"], want["model.embed_tokens.weight"])
        setup_weight_group(learner, rollout, backend="gloo", timeout_s=30)
        for _ in range(2):   # the group serves every step's sync
            m = sync_weights([learner], rollout, bucket_mb=0.25, timeout_s=60, worker_names=RECEIVERS,
                             path="broadcast")
            assert m["sync/buckets"] > 1 and m["sync/bytes"] == sum(t.numel() * 4 for t in want.values())
            for got in ray.get([w.state_dict.remote() for w in rollout]):
                assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
            assert ray.get(learner.held.remote()) == []
    finally:
        ray.shutdown()


@pytest.mark.gpu
def test_cuda_ipc_sync_between_two_processes_on_one_gpu(tiny_model_dir):
    """Colocated on one GPU (0.5 + 0.5): the learner's CUDA buckets reach a torch engine in another
    process by IPC handle, exactly, and are freed once it acknowledged."""
    from rlmem.train.actors import RolloutWorker, remote_class
    from rlmem.train.weight_sync import sync_weights

    ray = _ray_with_this_dir(num_gpus=1)
    try:
        learner = ray.remote(_sync_learner_class()).options(num_gpus=0.5).remote(str(tiny_model_dir), seed=3,
                                                                                 device="cuda")
        rollout = remote_class(RolloutWorker).options(num_gpus=0.5).remote(str(tiny_model_dir), backend="torch",
                                                                           dtype="float32")
        assert ray.get(rollout.info.remote())["device"].startswith("cuda:0")
        want = ray.get(learner.weights.remote())
        m = sync_weights([learner], [rollout], bucket_mb=0.25, timeout_s=60, worker_names=RECEIVERS[:1],
                         path="cuda_ipc")
        assert m["sync/buckets"] > 1 and ray.get(learner.held.remote()) == []
        got = {k: v.cpu() for k, v in ray.get(rollout.state_dict.remote()).items()}
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    finally:
        ray.shutdown()
