"""The Ray actors of a run: rollout workers (an NGC engine each) and learner workers (one DeepSpeed rank each).

Both are plain classes, wrapped with ``ray.remote`` by the driver (:func:`remote_class`), so they can
also be used in-process. Everything they exchange with the driver is plain data: token ids,
:class:`~rlmem.engine.sampling.SamplingParams`, :class:`~rlmem.eviction.policy.EvictionConfig`,
:class:`~rlmem.eviction.record.RolloutRecord` and metric dicts.

A learner worker is built in two calls: the constructor is cheap (no torch.distributed), and
:meth:`LearnerWorker.setup` joins the process group once the driver knows rank 0's address and a
free port on that node (:meth:`LearnerWorker.rendezvous_address`), so the rendezvous works across nodes.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from rlmem.engine.sampling import SamplingParams
from rlmem.eviction.policy import EvictionConfig
from rlmem.eviction.record import RolloutRecord


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _set_threads(num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(int(num_threads))


class RolloutWorker:
    """A rollout engine (any registered backend, by name) on its own copy of the policy."""

    def __init__(self, model_path: str, *, backend: str = "torch", dtype: str = "float32", seed: int = 0,
                 index: int = 0, num_threads: int | None = None, gpu_share: dict | None = None, **engine_options):
        from rlmem.engine.registry import create_engine, engine_traits

        _set_threads(num_threads)
        self.index = index
        self.backend, self.sleep_mode = backend, engine_traits(backend).sleep_mode
        self.weight_group = None
        engine_options = self._colocated_memory(backend, model_path, gpu_share, engine_options)
        # The torch engine runs where this actor's device plan says (its Ray GPU, or the CPU);
        # vLLM places itself on the GPUs Ray gave the actor.
        self.device_plan = None
        if backend == "torch":
            from rlmem.devices import current_plan

            self.device_plan = current_plan(dtype, what=f"rollout worker {index}")
            engine_options = {**engine_options, "device": self.device_plan.device}
        self.engine = create_engine(backend, model_path, dtype=dtype, seed=seed, **engine_options)
        self.num_layers = self.engine.num_layers

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams,
                 eviction_configs: list[EvictionConfig | None], greedy: bool = False
                 ) -> tuple[list[RolloutRecord], dict[str, float]]:
        """One rollout per prompt; returns the records and the engine's counters, with the call's
        wall-clock span (``started``, ``ended``: unix seconds) for the run's timeline."""
        started = time.time()
        records = self.engine.generate(prompt_ids, sampling, eviction_configs, greedy_evictions=greedy)
        s = self.engine.last_stats
        return records, {"new_tokens": float(s.new_tokens), "seconds": s.seconds, "rounds": float(s.rounds),
                         "peak_cache_bytes": float(s.peak_cache_bytes), "started": started, "ended": time.time()}

    def _colocated_memory(self, backend: str, model_path: str, gpu_share: dict | None, options: dict) -> dict:
        """Colocated on a GPU: vLLM's ``gpu_memory_utilization`` from this GPU's memory and the run's
        workload (:func:`rlmem.train.gpu_memory.colocated_plan`, the arithmetic docs/gpu.md shows)."""
        if not gpu_share or backend != "vllm" or not torch.cuda.is_available():
            return options
        from rlmem.train.gpu_memory import ModelDims, Workload, colocated_plan

        plan = colocated_plan(ModelDims.from_path(model_path), Workload(**gpu_share), torch.cuda.mem_get_info()[1])
        if plan.problem:
            raise ValueError(f"rollout worker {self.index}: placement colocated does not fit this GPU: {plan.problem}")
        print(f"[rlmem] rollout worker {self.index}: colocated, vLLM gpu_memory_utilization={plan.vllm_fraction:.2f} "
              f"(replaces rollout.vllm.gpu_memory_utilization; docs/gpu.md)", flush=True)
        return {**options, "gpu_memory_utilization": plan.vllm_fraction}

    def _load_bucket(self, bucket) -> int:
        """Stage (vLLM: loaded at :meth:`finish_weight_update`) or load one bucket; its parameter count."""
        from rlmem.models.weight_buckets import unpack_bucket

        if hasattr(self.engine, "stage_bucket"):       # engines that load a whole update at once (vLLM)
            return self.engine.stage_bucket(bucket)
        pairs = unpack_bucket(bucket)
        self.engine.load_weights(pairs)
        return len(pairs)

    def update_weights(self, bucket) -> int:
        """Load one weight-sync bucket (:class:`~rlmem.models.weight_buckets.Bucket`); return its parameter count."""
        return self._load_bucket(bucket)

    def receive_weights_ipc(self, metas: list) -> int:
        """CUDA IPC sync: open each bucket's handle in this process and load it; the learner holds the
        memory until the driver reports every engine loaded (:class:`rlmem.train.weight_sync.HeldBuckets`)."""
        from rlmem.train.weight_sync import open_ipc_bucket

        return sum(self._load_bucket(open_ipc_bucket(m)) for m in metas)

    def join_weight_group(self, addr: str, port: int, rank: int, world_size: int, backend: str,
                          timeout_s: float) -> int:
        from rlmem.train.weight_sync import WeightGroup

        self.weight_group = WeightGroup(addr, port, rank, world_size, backend, timeout_s)
        return rank

    def receive_weights_broadcast(self, metas: list) -> int:
        """Broadcast sync: receive each bucket from learner rank 0 and load it."""
        if self.weight_group is None:
            raise RuntimeError(f"rollout worker {self.index}: broadcast weight sync before joining the weight group")
        return sum(self._load_bucket(b) for b in self.weight_group.receive(metas))

    def finish_weight_update(self) -> int:
        """After the last bucket: load what was staged (vLLM); returns the parameter count loaded now.
        On CUDA, waits for the copies, so the learner may free the buckets once this returns."""
        n = self.engine.commit_weights() if hasattr(self.engine, "commit_weights") else 0
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return n

    def sleep(self) -> str | None:
        """Colocated: free the engine's GPU memory for the learner step. Returns None, or why nothing
        was freed (engine traits ``sleep_mode``: vLLM sleeps on CUDA only)."""
        if self.sleep_mode == "none":
            if torch.cuda.is_available():
                torch.cuda.empty_cache()   # the torch engine freed its caches after generate; hand them back
            return f"the {self.backend} engine has no sleep mode (it holds only its weights between rollouts)"
        if not hasattr(self.engine, "sleep"):
            return f"the {self.backend} engine declares sleep_mode={self.sleep_mode!r} but has no sleep()"
        return self.engine.sleep()

    def wake_up(self) -> None:
        """Before the weight sync that follows the learner step (loading wakes a vLLM engine anyway)."""
        if hasattr(self.engine, "wake_up"):
            self.engine.wake_up()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The engine's current weights (tests compare them with the learner's; in-process engines only)."""
        return {k: v.detach().clone() for k, v in self.engine.model.named_parameters()}

    def node_id(self) -> str:
        return _node_id()

    def ping(self) -> int:
        return self.index

    def info(self) -> dict[str, Any]:
        return {"index": self.index, "num_layers": self.num_layers, "node_id": _node_id(),
                "device": self.device_plan.describe() if self.device_plan else None}


class LearnerWorker:
    """One data-parallel rank of the DeepSpeed learner (:class:`rlmem.learner.learner.Learner`)."""

    def __init__(self, learner_config, *, rank: int, world_size: int, num_threads: int | None = None):
        from rlmem.devices import apply_plan, current_plan

        # This rank's device, from what Ray gave this actor (never the driver's view); applied
        # before anything imports DeepSpeed, which fixes its accelerator on import.
        self.device_plan = current_plan(learner_config.dtype, what=f"learner worker {rank} (rank {rank})")
        apply_plan(self.device_plan)
        _set_threads(num_threads)
        self.cfg = learner_config
        self.rank, self.world_size = rank, world_size
        self.learner = None
        self.publisher = self.weight_group = None   # GPU weight sync (rank 0)

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a port free on it right now (rank 0 hosts the process group)."""
        import ray

        from rlmem.ports import free_port

        return ray.util.get_node_ip_address(), free_port("")

    def setup(self, master_addr: str, master_port: int) -> float:
        """Join the process group and build the DeepSpeed engine (collective); return seconds taken."""
        from rlmem.learner.learner import Learner

        t0 = time.perf_counter()
        self.learner = Learner(self.cfg, rank=self.rank, world_size=self.world_size,
                               master_addr=master_addr, master_port=master_port, plan=self.device_plan)
        return time.perf_counter() - t0

    def train_step(self, records: list[RolloutRecord], advantages: list[float], global_num_sequences: int
                   ) -> dict[str, float]:
        """The learner's step; its metrics plus this rank's wall-clock span (``timeline/started``,
        ``timeline/ended``: unix seconds), which the driver takes out for the run's timeline."""
        started = time.time()
        m = self.learner.train_step(records, advantages, global_num_sequences=global_num_sequences)
        return {**m, "timeline/started": started, "timeline/ended": time.time()}

    def publish_weights(self, bucket_bytes: int) -> tuple[list[Any], int, int] | None:
        """Put the weights into the object store in buckets (collective); rank 0 returns
        ``(bucket refs, parameter count, bytes)``, other ranks ``None``."""
        import ray

        from rlmem.models.weight_buckets import make_buckets

        named = self.learner.named_parameters_for_sync()
        if self.rank != 0:
            for _ in named:   # ZeRO 3 gathers collectively: every rank walks the parameters
                pass
            return None
        refs, count, nbytes = [], 0, 0
        for b in make_buckets(named, bucket_bytes):
            refs.append(ray.put(b))
            count += len(b.names)
            nbytes += b.nbytes
        return refs, count, nbytes

    # ------------------------------------------------------------------ GPU weight sync (rlmem.train.weight_sync)
    def weights_on_cuda(self) -> bool:
        """Whether this rank's weights live on a GPU (the driver picks the sync path from it)."""
        return next(self.learner.policy.parameters()).is_cuda

    def publish_weights_shared(self, bucket_bytes: int, path: str, receivers: list[str]):
        """Bucket the weights on this rank's device and hold them (collective under ZeRO 3); rank 0
        returns ``(sync id, bucket metas, parameter count, bytes)``, other ranks ``None``. ``path``:
        ``cuda_ipc`` (metas carry IPC handles) or ``broadcast`` (sent by :meth:`send_weights_broadcast`)."""
        from rlmem.train.weight_sync import BucketPublisher

        named = self.learner.named_parameters_for_sync()
        if self.rank != 0:
            for _ in named:   # ZeRO 3 gathers collectively: every rank walks the parameters
                pass
            return None
        if getattr(self, "publisher", None) is None:
            self.publisher = BucketPublisher()
        share = None
        device = next(self.learner.policy.parameters()).device
        if path == "cuda_ipc":
            from torch.multiprocessing.reductions import reduce_tensor

            if device.type != "cuda":
                raise RuntimeError(f"weight sync cuda_ipc: learner rank 0 runs on {device}, not a GPU")
            share = reduce_tensor
        elif self.weight_group is not None:
            device = self.weight_group.device
        out = self.publisher.publish(named, bucket_bytes, device, receivers, share)
        if device.type == "cuda":
            torch.cuda.synchronize()   # the buckets are complete before another process reads them
        return out

    def send_weights_broadcast(self, sync_id: int) -> int:
        """Rank 0: broadcast the held buckets of ``sync_id`` over the weight group; returns bytes sent."""
        return self.weight_group.send(self.publisher.flats(sync_id))

    def weights_loaded(self, sync_id: int, workers: list[str]) -> bool:
        """The driver's acknowledgement: these rollout workers loaded ``sync_id``; True once all have
        and its buckets are freed."""
        released = self.publisher.ack(sync_id, workers)
        if released and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return released

    def release_weights(self, sync_id: int) -> list[str]:
        """Free ``sync_id``'s buckets now (a failed sync); returns who had not acknowledged."""
        return self.publisher.release(sync_id) if getattr(self, "publisher", None) else []

    def join_weight_group(self, addr: str, port: int, rank: int, world_size: int, backend: str,
                          timeout_s: float) -> int:
        from rlmem.train.weight_sync import WeightGroup

        self.weight_group = WeightGroup(addr, port, rank, world_size, backend, timeout_s)
        return rank

    def free_cached_memory(self) -> None:
        """Colocated: hand the step's freed activations back to the GPU before the engine wakes."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def save_checkpoint(self, ckpt_dir: str, client_state: dict | None = None) -> None:
        self.learner.save_checkpoint(ckpt_dir, client_state)

    def load_checkpoint(self, ckpt_dir: str) -> dict:
        return self.learner.load_checkpoint(ckpt_dir)

    def export_hf(self, out_dir: str) -> str:
        return str(self.learner.export_hf(out_dir))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights (collective under ZeRO 3); tests compare ranks and runs."""
        return {k: v.detach().clone() for k, v in self.learner.named_parameters_for_sync()}

    def node_id(self) -> str:
        return _node_id()

    def release_shared_memory(self) -> int:
        """Unlink DeepSpeed's CPU allreduce buffers before this rank is killed (Ray runs no exit hooks,
        and the files would stay in /dev/shm for good: rlmem.learner.deepspeed_shm). Returns how many."""
        from rlmem.learner.deepspeed_shm import release_own_buffers

        return len(release_own_buffers())


def remote_class(cls: type, *, max_concurrency: int = 1):
    """``ray.remote(cls)``: one definition, wrapped lazily so that importing this module needs no Ray."""
    import ray

    return ray.remote(max_concurrency=max_concurrency)(cls)
