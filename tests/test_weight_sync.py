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
