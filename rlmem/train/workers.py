"""Ray for a run: connect or start, check the requested resources exist, place and start the
rollout and learner actors, name them in errors, stop them.

``ray.address`` set → join it; inside a Ray job (``RAY_ADDRESS`` set) → join the job's cluster;
otherwise a small local Ray without dashboard, shut down at the end. A request the cluster can
never grant (GPUs or custom resources no node has) fails at once, naming the request and the
cluster's resources; one that is only busy fails after :data:`PLACEMENT_TIMEOUT_S`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from rlmem.run.config import RunConfig
from rlmem.run.errors import TrainingError

PLACEMENT_TIMEOUT_S = 120.0


def engine_options(cfg) -> dict:
    """Construction options of the rollout engine named by ``rollout.backend`` (one engine per actor)."""
    if cfg.rollout.backend != "vllm":
        return {}
    v = cfg.rollout.vllm
    return {"block_size": cfg.eviction.block_size, "kv_cache_gib": v.cpu_kvcache_space_gb,
            "enforce_eager": v.enforce_eager, "gpu_memory_utilization": v.gpu_memory_utilization}


def gpu_share(cfg) -> dict | None:
    """Colocated on GPUs: the :class:`rlmem.train.gpu_memory.Workload` (as a dict) from which each
    rollout worker computes, on its own GPU, the memory fraction its vLLM engine may take."""
    from dataclasses import asdict

    from rlmem.train.gpu_memory import workload_of

    if cfg.ray.placement != "colocated" or not cfg.ray.num_gpus_per_actor:
        return None
    return asdict(workload_of(cfg))


def actor_env() -> dict[str, str]:
    """Environment variables every actor gets (the driver's offline flags).

    Nothing about devices: each actor works out its own from what Ray gave it (rlmem.devices), so a
    CPU-only head node does not put GPU workers on the CPU.
    """
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env


def init_ray(cfg: RunConfig) -> bool:
    """Connect to or start Ray; return True when we started it (then we shut it down).

    No runtime_env here: inside a job it would have to merge with the job's (Ray refuses duplicate
    keys); the actors get their environment variables themselves (:func:`actor_env`).
    """
    import ray

    if ray.is_initialized():
        return False
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=True)
        return False
    if os.environ.get("RAY_ADDRESS"):   # inside `ray job submit`: the job's cluster
        ray.init(log_to_driver=True)
        return False
    need = (cfg.rollout.num_workers + cfg.learner.num_workers) * cfg.ray.num_cpus_per_actor
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(need)), include_dashboard=False,
             log_to_driver=True, logging_level="warning")
    return True


@dataclass
class Workers:
    rollout: list[Any]
    learners: list[Any]
    placement_groups: list[Any] = field(default_factory=list)
    rollout_names: list[str] = field(default_factory=list)
    learner_names: list[str] = field(default_factory=list)

    def name_of(self, actor_id) -> str | None:
        """The worker name of a Ray actor id (hex string or ActorID), for error messages."""
        if actor_id is None:
            return None
        want = actor_id if isinstance(actor_id, str) else actor_id.hex()
        for names, actors in ((self.rollout_names, self.rollout), (self.learner_names, self.learners)):
            for n, a in zip(names, actors):
                if a._actor_id.hex() == want:
                    return n
        return None


def merge_resources(a: dict, b: dict) -> dict:
    """Sum two resource requests key by key (one bundle holding a rollout and a learner actor)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def placement_plan(cfg: RunConfig, rollout_resources: dict | None, learner_resources: dict | None
                   ) -> list[tuple[str, list[dict]]]:
    """The placement groups a run asks for: ``[(name, bundles)]`` (no Ray needed; tested alone)."""
    r = cfg.ray
    n_roll, n_learn = cfg.rollout.num_workers, cfg.learner.num_workers

    def bundle(res: dict | None) -> dict:
        b = {"CPU": r.num_cpus_per_actor, **(res or {})}
        if r.num_gpus_per_actor:
            b["GPU"] = r.num_gpus_per_actor
        return b

    if r.placement == "colocated":
        # Bundle i holds rollout worker i and learner rank i; with GPUs, one GPU they share
        # (each asks for a part: actor_gpus), so the GPU is not summed like the other resources.
        n = max(n_roll, n_learn)
        plan = []
        for i in range(n):
            b = merge_resources({k: v for k, v in bundle(rollout_resources).items() if k != "GPU"} if i < n_roll else {},
                                {k: v for k, v in bundle(learner_resources).items() if k != "GPU"} if i < n_learn else {})
            if r.num_gpus_per_actor:
                b["GPU"] = r.num_gpus_per_actor
            plan.append(b)
        return [("rlmem-colocated", plan)]
    return [("rlmem-rollout", [bundle(rollout_resources) for _ in range(n_roll)]),
            ("rlmem-learner", [bundle(learner_resources) for _ in range(n_learn)])]


def actor_gpus(cfg: RunConfig, role: str, index: int) -> float:
    """Ray ``num_gpus`` of one actor (``role``: ``rollout`` or ``learner``). Colocated: the two actors
    of a bundle ask for parts that sum to the bundle's GPU (:func:`rlmem.train.gpu_memory.colocated_gpu_shares`),
    so Ray gives both the same GPU; an actor alone in its bundle gets all of it."""
    from rlmem.train.gpu_memory import colocated_gpu_shares

    r = cfg.ray
    if r.placement != "colocated" or not r.num_gpus_per_actor:
        return r.num_gpus_per_actor
    n_roll, n_learn = cfg.rollout.num_workers, cfg.learner.num_workers
    if index >= (n_learn if role == "rollout" else n_roll):
        return r.num_gpus_per_actor
    rollout_share, learner_share = colocated_gpu_shares(r.num_gpus_per_actor)
    return rollout_share if role == "rollout" else learner_share


def impossible_request(plan: list[tuple[str, list[dict]]], nodes: list[dict[str, float]]) -> str | None:
    """Why ``plan`` can never be placed on nodes with these total resources, or None.

    A bundle must fit on one node; a whole group (PACK may spread) must fit in the cluster's total.
    """
    total: dict[str, float] = {}
    for n in nodes:
        total = merge_resources(total, n)
    for name, bundles in plan:
        for b in bundles:
            if not any(all(n.get(k, 0.0) + 1e-9 >= v for k, v in b.items()) for n in nodes):
                missing = sorted(k for k, v in b.items() if max((n.get(k, 0.0) for n in nodes), default=0.0) < v)
                return (f"{name} asks for {b} per actor but no node has {', '.join(missing) or 'that much'}; "
                        f"cluster nodes have {[_fmt_res(n) for n in nodes]}")
        need: dict[str, float] = {}
        for b in bundles:
            need = merge_resources(need, b)
        short = sorted(k for k, v in need.items() if total.get(k, 0.0) + 1e-9 < v)
        if short:
            return (f"{name} asks for {need} in all but the cluster has only {_fmt_res(total)} "
                    f"(short of {', '.join(short)})")
    return None


def _fmt_res(res: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in sorted(res.items()) if not k.startswith(("node:", "object_store_memory", "memory"))}


def cluster_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def _placement_group(bundles: list[dict], name: str):
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(bundles, strategy="PACK", name=name)
    try:
        ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except GetTimeoutError:
        remove_placement_group(pg)
        raise TrainingError(f"Ray could not reserve {name} resources {bundles} within {PLACEMENT_TIMEOUT_S:.0f}s; "
                            f"cluster resources: {_fmt_res(ray.cluster_resources())} (lower ray.num_cpus_per_actor "
                            f"or the number of workers, or add nodes)") from None
    return pg


def actor_threads(cfg: RunConfig, cores: int) -> int:
    """Torch intra-op threads per actor: ``ray.torch_threads``, else the cores shared by the actors
    that compute at the same time. With ``trainer.max_staleness = 0`` rollouts and the learner take
    turns, so each role may use every core; with k >= 1 they run at once (docs/design.md section 5),
    and two roles each using every core slow both many-fold."""
    n_roll, n_learn = cfg.rollout.num_workers, cfg.learner.num_workers
    busy = n_roll + n_learn if cfg.trainer.max_staleness else max(n_roll, n_learn)
    return cfg.ray.torch_threads or max(1, cores // busy)


def start_workers(cfg: RunConfig, model_path: str, *, rollout_resources: dict[str, float] | None = None,
                  learner_resources: dict[str, float] | None = None) -> Workers:
    """Placement groups, then rollout and learner actors; the learners join their process group.

    ``ray.placement: colocated`` puts rollout worker i and learner rank i in bundle i of one group
    (sharing its GPU); ``split`` gives each role its own group. ``*_resources`` are extra per-actor custom Ray
    resources (e.g. ``{"rollout_node": 0.01}``) that pin a role to nodes advertising them.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from rlmem.train.actors import LearnerWorker, RolloutWorker, remote_class

    r = cfg.ray
    n_roll, n_learn = cfg.rollout.num_workers, cfg.learner.num_workers
    plan = placement_plan(cfg, rollout_resources, learner_resources)
    why = impossible_request(plan, cluster_nodes())
    if why:
        raise TrainingError(f"Ray can never place this run: {why}; change ray.num_gpus_per_actor / "
                            f"ray.num_cpus_per_actor / ray.*_resources or add nodes that have them", exit_code=2)
    pgs = [_placement_group(bundles, name) for name, bundles in plan]
    roll_pg, learn_pg = (pgs[0], pgs[0]) if len(pgs) == 1 else (pgs[0], pgs[1])
    threads = actor_threads(cfg, os.cpu_count() or 1)

    def opts(pg, i: int, res: dict | None, role: str) -> dict:
        o = dict(num_cpus=r.num_cpus_per_actor, resources=res or None, runtime_env={"env_vars": actor_env()},
                 scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
        gpus = actor_gpus(cfg, role, i)
        if gpus:
            o["num_gpus"] = gpus
        return o

    Rollout, Learner = remote_class(RolloutWorker), remote_class(LearnerWorker)
    share = gpu_share(cfg)
    rollout = [Rollout.options(**opts(roll_pg, i, rollout_resources, "rollout")).remote(
        model_path, backend=cfg.rollout.backend, dtype=cfg.model.dtype, seed=cfg.seed, index=i, num_threads=threads,
        gpu_share=share, **engine_options(cfg)) for i in range(n_roll)]
    lcfg = cfg.learner_config(model_path)
    learners = [Learner.options(**opts(learn_pg, i, learner_resources, "learner")).remote(
        lcfg, rank=i, world_size=n_learn, num_threads=threads) for i in range(n_learn)]
    w = Workers(rollout, learners, pgs, [f"rollout worker {i}" for i in range(n_roll)],
                [f"learner worker {i} (rank {i})" for i in range(n_learn)])
    addr, port = ray.get(learners[0].rendezvous_address.remote())
    ray.get([lw.setup.remote(addr, port) for lw in learners])
    ray.get([rw.ping.remote() for rw in rollout])
    return w


def stop_workers(w: Workers) -> None:
    """Kill our actors and free their placement groups (matters when the cluster outlives the run).
    Learners first unlink their shared-memory buffers (best effort, a few seconds at most: a dead or
    hung learner leaves its buffer to the next learner's sweep, rlmem.learner.deepspeed_shm)."""
    import ray
    from ray.util.placement_group import remove_placement_group

    try:
        ray.get([lw.release_shared_memory.remote() for lw in w.learners], timeout=5)
    except Exception:  # noqa: BLE001 - dead, hung, or stopped by a second Ctrl-C
        pass
    for a in w.rollout + w.learners:
        try:
            ray.kill(a)
        except Exception:  # noqa: BLE001 - already dead
            pass
    for pg in w.placement_groups:
        try:
            remove_placement_group(pg)
        except Exception:  # noqa: BLE001
            pass


def worker_nodes(w: Workers) -> dict[str, str]:
    """``{worker name: Ray node id}`` (where each actor actually runs)."""
    import ray

    ids = ray.get([a.node_id.remote() for a in w.rollout + w.learners])
    return dict(zip(w.rollout_names + w.learner_names, ids))
