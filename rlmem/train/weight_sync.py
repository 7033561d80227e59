"""Bucketed weight sync, learner -> rollout workers: three paths behind one call, each with a deadline.

Peers send one parameter at a time (thousands of tiny transfers) or one giant blob, and a stuck
receiver hangs the run forever. Here parameters are flattened into buckets of about
``ray.weight_sync_bucket_mb`` (one dtype per bucket, so the flat tensor is exact:
:mod:`rlmem.models.weight_buckets`, the one packing), and the driver waits with a deadline: a
timeout raises :class:`WeightSyncError` naming the workers that did not answer. Every worker
reports how many parameters it loaded, so a silently skipped bucket is an error too.

``ray.weight_sync`` picks the path (``auto``: by the learner's device and the placement):

* ``object_store`` (CPU): learner rank 0 puts each bucket into the Ray object store once; every
  rollout worker pulls and unpacks it.
* ``cuda_ipc`` (colocated on GPUs): learner rank 0 makes the buckets on its GPU and sends CUDA IPC
  handles through Ray; each rollout worker opens them in its own process and loads the views. The
  flat tensors stay alive on the learner (:class:`HeldBuckets`) until every engine acknowledged
  loading them: freeing them earlier would let the allocator hand that memory to the next step
  while an engine still reads it.
* ``broadcast`` (split on GPUs): a dedicated process group of learner rank 0 and the rollout workers
  (:class:`WeightGroup`; NCCL on GPUs, gloo on CPU, so the same code runs in the CPU tests)
  broadcasts each bucket; held the same way until every worker loaded it.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from rlmem.models.weight_buckets import Bucket, make_buckets

PATHS = ("object_store", "cuda_ipc", "broadcast")


class WeightSyncError(RuntimeError):
    """A weight sync that timed out or did not load every parameter; names the worker(s)."""


def choose_path(setting: str, *, placement: str, learner_on_cuda: bool) -> str:
    """The sync path of ``ray.weight_sync`` (``auto``: object store without CUDA, CUDA IPC colocated,
    broadcast split)."""
    if setting != "auto":
        if setting not in PATHS:
            raise ValueError(f"ray.weight_sync must be auto or one of {', '.join(PATHS)} (got {setting!r})")
        return setting
    if not learner_on_cuda:
        return "object_store"
    return "cuda_ipc" if placement == "colocated" else "broadcast"


def sync_weights(learners: Sequence[Any], rollout_workers: Sequence[Any], *, bucket_mb: float,
                 timeout_s: float, worker_names: Sequence[str] | None = None,
                 path: str = "object_store") -> dict[str, float]:
    """Send the learner's weights to every rollout worker; return ``{time/sync, sync/bytes, sync/buckets}``.

    ``learners`` are LearnerWorker actors (all ranks take part: gathering is collective under
    ZeRO 3; rank 0 publishes), ``rollout_workers`` RolloutWorker actors, ``path`` one of :data:`PATHS`
    (``broadcast`` needs :func:`setup_weight_group` first).
    """
    names = list(worker_names) if worker_names else [f"rollout worker {i}" for i in range(len(rollout_workers))]
    if path != "object_store":
        return _sync_shared(learners, rollout_workers, names, bucket_mb=bucket_mb, timeout_s=timeout_s, path=path)
    import ray
    from ray.exceptions import GetTimeoutError

    t0 = time.perf_counter()
    deadline = t0 + timeout_s
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


# ----------------------------------------------------------------------------------------------
# GPU paths: buckets held on the learner until acknowledged


@dataclass(frozen=True)
class BucketMeta:
    """What a receiver needs to rebuild one bucket: names, shapes, dtype, element count, and for CUDA
    IPC the handle (``torch.multiprocessing.reductions.reduce_tensor`` of the flat tensor)."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    dtype: str
    numel: int
    handle: Any = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


class HeldBuckets:
    """The flat tensors of one sync, kept alive on the learner until every receiver acknowledged
    loading them (:meth:`ack`), or until :meth:`release` (a timeout: the run stops)."""

    def __init__(self, sync_id: int, flats: Sequence[torch.Tensor], receivers: Iterable[str]):
        self.sync_id = sync_id
        self.flats: list[torch.Tensor] | None = list(flats)
        self.receivers = set(receivers)
        self.acked: set[str] = set()

    @property
    def released(self) -> bool:
        return self.flats is None

    @property
    def missing(self) -> list[str]:
        return sorted(self.receivers - self.acked)

    def ack(self, worker: str) -> bool:
        """``worker`` loaded every bucket; returns whether the tensors are now released."""
        if worker not in self.receivers:
            raise WeightSyncError(f"weight sync {self.sync_id}: {worker} acknowledged but is not one of its "
                                  f"receivers ({', '.join(sorted(self.receivers))})")
        self.acked.add(worker)
        if not self.missing:
            self.release()
        return self.released

    def release(self) -> None:
        self.flats = None


class BucketPublisher:
    """Learner rank 0's side of a GPU sync: buckets on its device, one :class:`HeldBuckets` per sync."""

    def __init__(self):
        self.held: dict[int, HeldBuckets] = {}
        self._next = 0

    def publish(self, named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, device: str | torch.device,
                receivers: Iterable[str], share: Callable[[torch.Tensor], Any] | None = None
                ) -> tuple[int, list[BucketMeta], int, int]:
        """Bucket ``named`` on ``device`` and hold them; returns ``(sync id, metas, parameters, bytes)``.
        ``share``: makes each meta's handle (CUDA IPC), ``None`` for a broadcast."""
        buckets = list(make_buckets(named, bucket_bytes, device=device))
        metas = [BucketMeta(list(b.names), [tuple(s) for s in b.shapes], str(b.flat.dtype).removeprefix("torch."),
                            b.flat.numel(), share(b.flat) if share else None) for b in buckets]
        self._next += 1
        self.held[self._next] = HeldBuckets(self._next, [b.flat for b in buckets], receivers)
        return self._next, metas, sum(len(b.names) for b in buckets), sum(b.nbytes for b in buckets)

    def flats(self, sync_id: int) -> list[torch.Tensor]:
        h = self.held.get(sync_id)
        if h is None or h.released:
            raise WeightSyncError(f"weight sync {sync_id}: its buckets were already released")
        return h.flats

    def ack(self, sync_id: int, workers: Iterable[str]) -> bool:
        """Workers that loaded sync ``sync_id``; releases its buckets once all have (returns whether)."""
        h = self.held[sync_id]
        for w in workers:
            h.ack(w)
        if h.released:
            del self.held[sync_id]
        return h.released

    def release(self, sync_id: int) -> list[str]:
        """Drop sync ``sync_id``'s buckets now (a timeout); returns the receivers that had not acknowledged."""
        h = self.held.pop(sync_id, None)
        if h is None:
            return []
        h.release()
        return h.missing


def open_ipc_bucket(meta: BucketMeta, device_index: int | None = None) -> Bucket:
    """Rebuild a bucket from its CUDA IPC handle in this (the receiving) process, on its own view of
    the GPU (``device_index``: its current device; Ray numbers the visible GPUs per process)."""
    func, args = meta.handle
    args = list(args)
    if device_index is None:
        device_index = torch.cuda.current_device()
    args[6] = device_index   # rebuild_cuda_tensor's storage_device
    return Bucket(list(meta.names), [tuple(s) for s in meta.shapes], func(*args))


class WeightGroup:
    """A process group of learner rank 0 (rank 0, the sender) and the rollout workers, only for
    weights: its own TCP store and process group object, so it neither joins nor disturbs the
    learners' DeepSpeed group. NCCL between GPUs, gloo on CPU; every operation times out."""

    def __init__(self, addr: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float):
        import torch.distributed as dist

        td = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.store = dist.TCPStore(addr, port, world_size, rank == 0, timeout=td)
        if backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = td
            self.pg = dist.ProcessGroupNCCL(self.store, rank, world_size, opts)
            self.device = torch.device("cuda", torch.cuda.current_device())
        elif backend == "gloo":
            self.pg = dist.ProcessGroupGloo(self.store, rank, world_size, td)
            self.device = torch.device("cpu")
        else:
            raise ValueError(f"weight group backend must be nccl or gloo (got {backend!r})")

    def _broadcast(self, t: torch.Tensor) -> None:
        from rlmem.collectives import broadcast

        broadcast(t, src=0, process_group=self.pg)

    def send(self, flats: Sequence[torch.Tensor]) -> int:
        """Rank 0: broadcast each flat bucket (already on :attr:`device`); returns the bytes sent."""
        for t in flats:
            self._broadcast(t)
        return sum(t.numel() * t.element_size() for t in flats)

    def receive(self, metas: Sequence[BucketMeta]) -> Iterable[Bucket]:
        """Other ranks: one received bucket per meta, in order."""
        for m in metas:
            flat = torch.empty(m.numel, dtype=m.torch_dtype, device=self.device)
            self._broadcast(flat)
            yield Bucket(list(m.names), [tuple(s) for s in m.shapes], flat)


def setup_weight_group(learner0: Any, rollout_workers: Sequence[Any], *, backend: str, timeout_s: float) -> None:
    """Join learner rank 0 and every rollout worker in a :class:`WeightGroup` (for ``broadcast``)."""
    import ray
    from ray.exceptions import GetTimeoutError

    addr, port = ray.get(learner0.rendezvous_address.remote())
    world = 1 + len(rollout_workers)
    refs = [learner0.join_weight_group.remote(addr, port, 0, world, backend, timeout_s)]
    refs += [w.join_weight_group.remote(addr, port, i + 1, world, backend, timeout_s)
             for i, w in enumerate(rollout_workers)]
    try:
        ray.get(refs, timeout=timeout_s + 10)
    except GetTimeoutError:
        raise WeightSyncError(f"the weight-sync process group ({backend}, {world} members at {addr}:{port}) did not "
                              f"form within {timeout_s:.0f}s (ray.weight_sync_timeout_s)") from None


def _sync_shared(learners: Sequence[Any], rollout_workers: Sequence[Any], names: list[str], *, bucket_mb: float,
                 timeout_s: float, path: str) -> dict[str, float]:
    """The GPU paths (module docstring): publish and hold, transfer, load, acknowledge, release."""
    import ray
    from ray.exceptions import GetTimeoutError

    t0 = time.perf_counter()
    deadline = t0 + timeout_s
    left = lambda: max(0.0, deadline - time.perf_counter())   # noqa: E731
    pub = [lw.publish_weights_shared.remote(int(bucket_mb * 2**20), path, names) for lw in learners]
    try:
        sync_id, metas, expected, nbytes = ray.get(pub, timeout=timeout_s)[0]
    except GetTimeoutError:
        raise WeightSyncError(f"weight sync ({path}) timed out after {timeout_s:.0f}s (ray.weight_sync_timeout_s) "
                              f"while the learner workers gathered and bucketed their weights") from None
    released = False
    try:
        method = "receive_weights_ipc" if path == "cuda_ipc" else "receive_weights_broadcast"
        pending = {name: getattr(w, method).remote(metas) for name, w in zip(names, rollout_workers)}
        send = learners[0].send_weights_broadcast.remote(sync_id) if path == "broadcast" else None
        loaded: dict[str, int] = {}
        for name, ref in pending.items():
            try:
                loaded[name] = ray.get(ref, timeout=left())
            except GetTimeoutError:
                stuck = [n for n in pending if n not in loaded]
                raise WeightSyncError(f"weight sync ({path}) timed out after {timeout_s:.0f}s "
                                      f"(ray.weight_sync_timeout_s): {', '.join(stuck)} did not finish loading "
                                      f"{len(metas)} buckets ({nbytes / 2**20:.1f} MiB)") from None
        if send is not None:
            try:
                ray.get(send, timeout=left())
            except GetTimeoutError:
                raise WeightSyncError(f"weight sync (broadcast) timed out after {timeout_s:.0f}s: learner rank 0 "
                                      f"did not finish sending") from None
        for name, n in loaded.items():
            if n != expected:
                raise WeightSyncError(f"weight sync: {name} loaded {n} parameters, the learner sent {expected}")
        finish = {name: w.finish_weight_update.remote() for name, w in zip(names, rollout_workers)}
        done = []
        for name, ref in finish.items():
            try:
                ray.get(ref, timeout=left())
            except GetTimeoutError:
                raise WeightSyncError(f"weight sync ({path}) timed out after {timeout_s:.0f}s "
                                      f"(ray.weight_sync_timeout_s): {name} did not finish loading the staged "
                                      f"weights") from None
            done.append(name)
        # Every engine has loaded (and dropped) the shared buckets: the learner may free them now.
        released = ray.get(learners[0].weights_loaded.remote(sync_id, done), timeout=max(left(), 10.0))
    finally:
        if not released:
            try:
                ray.get(learners[0].release_weights.remote(sync_id), timeout=10)
            except Exception:  # noqa: BLE001 - a hung learner: the run is stopping anyway
                pass
    return {"time/sync": time.perf_counter() - t0, "sync/bytes": float(nbytes), "sync/buckets": float(len(metas))}
