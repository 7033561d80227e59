"""Bucketed weight sync, learner -> rollout workers, through the Ray object store.

Peers send one parameter at a time (thousands of tiny transfers) or one giant blob, and a stuck
receiver hangs the run forever. Here parameters are flattened into buckets of about
``ray.weight_sync_bucket_mb`` (one dtype per bucket, so the flat tensor is exact), learner rank 0
puts each bucket into the object store once, every rollout worker pulls and unpacks it, and the
driver waits with a deadline: a timeout raises :class:`WeightSyncError` naming the workers that
did not answer. Every worker reports how many parameters it loaded, so a silently skipped bucket
is an error too.

The packing (:mod:`rlmem.models.weight_buckets`) is shared with the engines' own transports.
"""

from __future__ import annotations

import time
from typing import Any, Sequence


class WeightSyncError(RuntimeError):
    """A weight sync that timed out or did not load every parameter; names the worker(s)."""


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
