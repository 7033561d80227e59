"""The training driver: one NGC (Dr. GRPO) run on Ray, from a validated :class:`RunConfig`.

Each step: take the next prompts (a pure function of the data position, so resume is exact) →
ε per group (curriculum / interoception, tag in the prompt) → rollouts on the rollout workers
(each prompt repeated ``rollouts_per_prompt`` times, groups contiguous) → decode → rewards →
group advantages → learner ``train_step`` on data-parallel shards → weight sync → metrics, samples,
pictures → checkpoint. All randomness of a step is derived from ``(seed, step)`` (data order,
ε draws, sampling seeds), so step N+1 of a resumed run equals step N+1 of an uninterrupted one.

Ray: ``ray.address`` set → join it; inside a Ray job (``RAY_ADDRESS`` set) → join the job's
cluster; otherwise a small local Ray without dashboard, shut down at the end (also on Ctrl-C).
Placement groups are checked with a deadline so a run that cannot get its resources says so
instead of hanging.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rlmem.train.config import COUNTDOWN_GENERATED, RunConfig

PLACEMENT_TIMEOUT_S = 120.0


class TrainingError(RuntimeError):
    """A run that cannot continue (dead worker, unavailable backend); says what to do next."""


# ----------------------------------------------------------------------------------------------
# Data: a deterministic, resumable prompt stream


def load_task_examples(cfg: RunConfig, source: str, split: str, limit: int | None) -> list[dict]:
    """Problems of ``source``/``split`` in file/generator order. Generated Countdown always uses the
    training generator's settings (``data.countdown``), so train and eval splits are the same kind of
    problem, from disjoint seeds, with train leaks dropped from the test split."""
    from rlmem.data import load_examples

    if source == COUNTDOWN_GENERATED:
        c = cfg.data.countdown
        return load_examples(COUNTDOWN_GENERATED, split, limit=limit, seed=c.seed,
                             num_examples=c.num_problems, num_numbers=(c.min_numbers, c.max_numbers),
                             number_range=(1, c.max_number), target_range=(c.min_target, c.max_target))
    return load_examples(source, split, limit=limit, seed=cfg.seed)


def load_train_examples(cfg: RunConfig) -> list[dict]:
    """The training problems (shuffling is per epoch, see :func:`prompt_indices`)."""
    return load_task_examples(cfg, cfg.data.source, cfg.data.split, cfg.data.limit)


def prompt_indices(position: int, count: int, num_examples: int, seed: int, shuffle: bool) -> list[int]:
    """Indices of the ``count`` prompts starting at stream ``position``; epoch ``e`` is a permutation
    seeded by ``(seed, e)``, so any position can be reproduced without replaying earlier steps."""
    out = []
    for p in range(position, position + count):
        epoch, i = divmod(p, num_examples)
        if shuffle:
            perm = np.random.default_rng([seed & 0xFFFFFFFF, epoch, 0xDA7A]).permutation(num_examples)
            out.append(int(perm[i]))
        else:
            out.append(i)
    return out


def step_seed(seed: int, step: int, worker: int) -> int:
    """The sampling seed of rollout worker ``worker`` at ``step`` (token and eviction sampling)."""
    return int(np.random.default_rng([seed & 0xFFFFFFFF, step, worker, 0x5EED]).integers(0, 2**62))


# ----------------------------------------------------------------------------------------------
# Ray start-up and workers


def _learner_config(cfg: RunConfig, model_path: str):
    from rlmem.train.learner import LearnerConfig

    a, o, lr = cfg.algorithm, cfg.optimizer, cfg.learner
    return LearnerConfig(
        model_path=model_path, dtype=lr.dtype, zero_stage=lr.zero_stage, micro_batch_size=lr.micro_batch_size,
        lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, grad_clip=o.grad_clip,
        schedule=o.schedule, warmup_steps=o.warmup_steps,
        total_steps=cfg.trainer.total_steps * a.mini_batches * a.ppo_epochs, min_lr_ratio=o.min_lr_ratio,
        gradient_checkpointing=lr.gradient_checkpointing, offload_optimizer=lr.offload_optimizer,
        aggregation=a.aggregation, max_len=a.loss_constant or cfg.rollout.max_new_tokens, mem_coef=a.mem_coef,
        clip_eps=a.clip_eps, clip_eps_high=a.clip_eps_high, mini_batches=a.mini_batches, ppo_epochs=a.ppo_epochs,
        replay_kernel=lr.replay_kernel, replay_mask=lr.replay_mask, seed=cfg.seed)


def check_supported(cfg: RunConfig) -> None:
    """What the config schema allows but this driver does not do yet: fail before Ray starts."""
    if cfg.rollout.backend == "vllm":
        raise TrainingError("rollout.backend: vllm is not available yet in the training driver; "
                            "use rollout.backend: torch (the reference engine)")
    if cfg.algorithm.kl_coef > 0:
        raise TrainingError("algorithm.kl_coef: a KL penalty is not implemented (NGC uses 0); set it to 0")


def _actor_env() -> dict[str, str]:
    import torch

    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env


def init_ray(cfg: RunConfig) -> bool:
    """Connect to or start Ray; return True when we started it (then we shut it down).

    No runtime_env here: inside a job it would have to merge with the job's (Ray refuses duplicate
    keys); the actors get their environment variables themselves (:func:`_actor_env`).
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


def _placement_group(bundles: list[dict], name: str):
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import placement_group

    pg = placement_group(bundles, strategy="PACK", name=name)
    try:
        ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except GetTimeoutError:
        raise TrainingError(f"Ray could not reserve {name} resources {bundles} within {PLACEMENT_TIMEOUT_S:.0f}s; "
                            f"cluster resources: {ray.cluster_resources()} (lower ray.num_cpus_per_actor or "
                            f"the number of workers, or add nodes)") from None
    return pg


def start_workers(cfg: RunConfig, model_path: str, *, rollout_resources: dict[str, float] | None = None,
                  learner_resources: dict[str, float] | None = None) -> Workers:
    """Placement groups, then rollout and learner actors; the learners join their process group.

    ``ray.placement: colocated`` puts rollout worker i and learner rank i in bundle i of one group;
    ``separate`` gives each role its own group. ``*_resources`` are extra per-actor custom Ray
    resources (e.g. ``{"rollout_node": 0.01}``) that pin a role to nodes advertising them.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from rlmem.train.actors import LearnerWorker, RolloutWorker, remote_class

    r = cfg.ray
    n_roll, n_learn = cfg.rollout.num_workers, cfg.learner.num_workers
    cpu, gpu = r.num_cpus_per_actor, r.num_gpus_per_actor
    roll_res, learn_res = dict(rollout_resources or {}), dict(learner_resources or {})
    threads = max(1, (os.cpu_count() or 1) // max(n_roll, n_learn))

    def bundle(res: dict) -> dict:
        b = {"CPU": cpu, **res}
        if gpu:
            b["GPU"] = gpu
        return b

    if r.placement == "colocated":
        n = max(n_roll, n_learn)
        pgs = [_placement_group([_merge(bundle(roll_res) if i < n_roll else {}, bundle(learn_res) if i < n_learn else {})
                                 for i in range(n)], "rlmem-colocated")]
        roll_pg = learn_pg = pgs[0]
    else:
        roll_pg = _placement_group([bundle(roll_res) for _ in range(n_roll)], "rlmem-rollout")
        learn_pg = _placement_group([bundle(learn_res) for _ in range(n_learn)], "rlmem-learner")
        pgs = [roll_pg, learn_pg]

    def opts(pg, i: int, res: dict) -> dict:
        o = dict(num_cpus=cpu, resources=res or None, runtime_env={"env_vars": _actor_env()},
                 scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
        if gpu:
            o["num_gpus"] = gpu
        return o

    Rollout, Learner = remote_class(RolloutWorker), remote_class(LearnerWorker)
    rollout = [Rollout.options(**opts(roll_pg, i, roll_res)).remote(
        model_path, dtype=cfg.model.dtype, seed=cfg.seed, index=i, num_threads=threads) for i in range(n_roll)]
    lcfg = _learner_config(cfg, model_path)
    learners = [Learner.options(**opts(learn_pg, i, learn_res)).remote(
        lcfg, rank=i, world_size=n_learn, num_threads=threads) for i in range(n_learn)]
    w = Workers(rollout, learners, pgs, [f"rollout worker {i}" for i in range(n_roll)],
                [f"learner worker {i} (rank {i})" for i in range(n_learn)])
    addr, port = ray.get(learners[0].rendezvous_address.remote())
    ray.get([lw.setup.remote(addr, port) for lw in learners])
    ray.get([rw.ping.remote() for rw in rollout])
    return w


def stop_workers(w: Workers) -> None:
    """Kill our actors and free their placement groups (matters when the cluster outlives the run)."""
    import ray
    from ray.util.placement_group import remove_placement_group

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


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


# ----------------------------------------------------------------------------------------------
# One step's pieces (pure functions where possible)


def split_even(items: list, parts: int) -> list[list]:
    """Contiguous, equal-sized parts (the config checked divisibility); groups stay contiguous."""
    n = len(items) // parts
    return [items[i * n:(i + 1) * n] for i in range(parts)]


def decode_completion(tokenizer, ids: list[int]) -> str:
    """Completion text for the verifier: special tokens kept (``<answer>`` may be one), final EOS dropped."""
    eos = tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] == eos:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


def compute_rewards(cfg: RunConfig, texts: list[str], examples: list[dict], prompts: list[str]) -> tuple[list[float], list[float]]:
    """The configured verifier, TRL-style (completions plus the example columns as lists), plus the
    weighted shaping rewards. Returns ``(total, verifier)``: accuracy is measured on the verifier alone."""
    from rewards import get_reward

    cols: dict[str, list] = {}
    for k in examples[0]:
        if k not in ("prompt", "completions"):
            cols[k] = [ex.get(k) for ex in examples]

    def call(name: str, kwargs: dict) -> list[float]:
        out = get_reward(name)(texts, prompts=prompts, **cols, **kwargs)
        if len(out) != len(texts):
            raise TrainingError(f"reward {name!r} returned {len(out)} values for {len(texts)} completions")
        return [0.0 if v is None else float(v) for v in out]

    verifier = call(cfg.data.reward, cfg.data.reward_kwargs)
    total = list(verifier)
    for sh in cfg.data.shaping:
        total = [t + sh.weight * v for t, v in zip(total, call(sh.name, sh.kwargs))]
    return total, verifier


def rollout_metrics(records, rewards: list[float], verifier: list[float], group_eps: list[float],
                    num_layers: int) -> dict[str, float]:
    """Reward (with shaping), accuracy (verifier alone), lengths and eviction statistics of one step."""
    from rlmem.eviction.record import peak_kv
    from rlmem.metrics import peak_kv_reduction

    r = np.asarray(rewards, dtype=np.float64)
    comp = np.asarray([len(x.completion_ids) for x in records], dtype=np.float64)
    prm = np.asarray([len(x.prompt_ids) for x in records], dtype=np.float64)
    peaks = [max(1, peak_kv(x, num_layers)) for x in records]
    rounds = np.asarray([x.num_rounds for x in records], dtype=np.float64)
    finish = [x.extra.get("finish_reason", "") for x in records]
    return {
        "reward/mean": float(r.mean()), "reward/std": float(r.std()),
        "reward/verifier_mean": float(np.mean(verifier)),
        "accuracy/mean": float((np.asarray(verifier) >= 1.0).mean()),   # binary verifiers: 1 = correct
        "response_length/mean": float(comp.mean()), "response_length/max": float(comp.max()),
        "response_length/min": float(comp.min()), "prompt_length/mean": float(prm.mean()),
        "response/clipped_frac": float(np.mean([f == "length" for f in finish])),
        "eviction/eps": float(np.mean(group_eps)), "eviction/rounds_mean": float(rounds.mean()),
        "eviction/no_round_frac": float((rounds == 0).mean()),
        "eviction/peak_kv_mean": float(np.mean(peaks)), "eviction/peak_kv_max": float(np.max(peaks)),
        "eviction/peak_kv_reduction": peak_kv_reduction(prm.astype(int).tolist(), comp.astype(int).tolist(), peaks),
    }


_LEARNER_RENAME = {"grad_norm": "optim/grad_norm", "lr": "optim/lr", "global_step": "optim/global_step",
                   "optimizer_steps": "optim/steps", "time/train_step": "learner/time_train_step",
                   "time/replay_forward": "learner/time_replay_forward", "time/backward": "learner/time_backward",
                   "time/optimizer": "learner/time_optimizer"}


# ----------------------------------------------------------------------------------------------
# The run


def run_training(cfg: RunConfig, *, rollout_resources: dict[str, float] | None = None,
                 learner_resources: dict[str, float] | None = None) -> dict[str, Any]:
    """Train per ``cfg``; return a summary (steps, last metrics, paths). See the module docstring.

    ``rollout_resources`` / ``learner_resources`` default to ``ray.rollout_resources`` /
    ``ray.learner_resources`` (custom Ray resources that pin each role to its nodes)."""
    import ray
    import torch
    from transformers import AutoTokenizer

    from rlmem.engine.sampling import SamplingParams
    from rlmem.eviction.record import evicted_at
    from rlmem.loss import group_advantages
    from rlmem.train import checkpoint as ckpt
    from rlmem.train.curriculum import group_eps
    from rlmem.train.evaluation import eval_metrics, evaluate, load_eval_examples
    from rlmem.train.logger import RunLogger
    from rlmem.train.weight_sync import sync_weights

    check_supported(cfg)
    if rollout_resources is None:
        rollout_resources = cfg.ray.rollout_resources
    if learner_resources is None:
        learner_resources = cfg.ray.learner_resources
    out = cfg.output_path
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    model_path = cfg.resolve_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples = load_train_examples(cfg)
    if not examples:
        raise TrainingError(f"data.source {cfg.data.source!r} gave no training examples")
    eval_examples = load_eval_examples(cfg)
    if cfg.eval.source and not eval_examples:
        raise TrainingError(f"eval.source {cfg.eval.source!r} (split {cfg.eval.split!r}) gave no evaluation examples")

    resume_dir = ckpt.resolve_resume(out, cfg.trainer.resume)
    state = ckpt.load_trainer_state(resume_dir) if resume_dir else ckpt.TrainerState(step=0)
    start = state.step
    if start >= cfg.trainer.total_steps:
        print(f"[rlmem] {resume_dir} already has {start} >= trainer.total_steps={cfg.trainer.total_steps} steps; "
              f"nothing to do", flush=True)
        return {"steps": start, "resumed_from": str(resume_dir), "output_dir": str(out), "metrics": None}

    a = cfg.algorithm
    P, G = a.prompts_per_step, a.rollouts_per_prompt
    n_samples = P * G
    sampling_base = dict(temperature=cfg.rollout.temperature, top_k=cfg.rollout.top_k or 0,
                         top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
                         stop=list(cfg.rollout.stop))
    min_len_rule = a.min_length_rule

    started_ray = init_ray(cfg)
    logger = None
    workers: Workers | None = None
    last_ckpt = resume_dir
    step = start
    row: dict[str, Any] = {}
    nodes: dict[str, str] = {}
    try:
        t0 = time.perf_counter()
        workers = start_workers(cfg, model_path, rollout_resources=rollout_resources,
                                learner_resources=learner_resources)
        num_layers = ray.get(workers.rollout[0].info.remote())["num_layers"]
        nodes = worker_nodes(workers)
        if resume_dir is not None:
            ray.get([lw.load_checkpoint.remote(str(resume_dir)) for lw in workers.learners])
            if state.rng:
                ckpt.restore_rng_state(state.rng)
        # Rollout workers start from the learner's weights (also after resume, and when dtypes differ).
        sync0 = sync_weights(workers.learners, workers.rollout, bucket_mb=cfg.ray.weight_sync_bucket_mb,
                             timeout_s=cfg.ray.weight_sync_timeout_s, worker_names=workers.rollout_names)
        startup_s = time.perf_counter() - t0
        logger = RunLogger.from_config(cfg, run_id=state.wandb_run_id, start_step=start)
        bs = cfg.batch_sizes()
        logger.print(f"[rlmem] {'resumed from ' + str(resume_dir) if resume_dir else 'new run'}; "
                      f"{P} prompts x {G} rollouts = {n_samples} samples/step on {bs.rollout_workers} rollout + "
                      f"{bs.learner_workers} learner workers; start-up {startup_s:.1f}s "
                      f"(weight sync {sync0['time/sync']:.2f}s)")

        for step in range(start, cfg.trainer.total_steps):
            t_step = time.perf_counter()
            # 1. prompts and per-group ε
            idx = prompt_indices(step * P, P, len(examples), cfg.seed, cfg.data.shuffle)
            exs = [examples[i] for i in idx]
            eps = group_eps(cfg.eviction, P, step, cfg.seed)
            tagged = cfg.eviction.interoception.enabled
            texts_p = [_prompt_text(ex, tokenizer, cfg, e if tagged else None) for ex, e in zip(exs, eps)]
            ids_p = [tokenizer.encode(t, add_special_tokens=False) for t in texts_p]
            ev_cfgs = [cfg.eviction_config(e) if e > 0 else None for e in eps]
            prompt_ids = [ids_p[g] for g in range(P) for _ in range(G)]
            sample_cfgs = [ev_cfgs[g] for g in range(P) for _ in range(G)]

            # 2. rollouts
            t = time.perf_counter()
            futs = [w.generate.remote(p, SamplingParams(**sampling_base, seed=step_seed(cfg.seed, step, i)), c)
                    for i, (w, p, c) in enumerate(zip(workers.rollout, split_even(prompt_ids, len(workers.rollout)),
                                                       split_even(sample_cfgs, len(workers.rollout))))]
            results = ray.get(futs)
            records = [r for recs, _ in results for r in recs]
            gen_tokens = sum(s["new_tokens"] for _, s in results)
            time_rollout = time.perf_counter() - t

            # 3. rewards and advantages
            t = time.perf_counter()
            texts_c = [decode_completion(tokenizer, r.completion_ids) for r in records]
            rows_ex = [exs[g] for g in range(P) for _ in range(G)]
            rewards, verifier = compute_rewards(cfg, texts_c, rows_ex, [texts_p[g] for g in range(P) for _ in range(G)])
            zeroed = 0
            if min_len_rule:
                for i, r in enumerate(records):
                    if r.eviction_config is not None and r.num_rounds == 0 and rewards[i] != 0.0:
                        rewards[i], zeroed = 0.0, zeroed + 1
            for r, v in zip(records, rewards):
                r.reward = v
            adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), G, scale_by_std=a.scale_by_std)
            time_reward = time.perf_counter() - t

            # 4. learner
            t = time.perf_counter()
            shards = split_even(list(range(n_samples)), len(workers.learners))
            lm = ray.get([lw.train_step.remote([records[i] for i in s], adv[s].tolist(), n_samples)
                          for lw, s in zip(workers.learners, shards)])[0]
            time_learner = time.perf_counter() - t

            # 5. weight sync
            sm = sync_weights(workers.learners, workers.rollout, bucket_mb=cfg.ray.weight_sync_bucket_mb,
                              timeout_s=cfg.ray.weight_sync_timeout_s, worker_names=workers.rollout_names)

            # 6. metrics, samples, pictures
            metrics = rollout_metrics(records, rewards, verifier,
                                      [ev_cfgs[g].eps if ev_cfgs[g] else 0.0 for g in range(P)], num_layers)
            metrics["reward/zeroed_before_first_round"] = float(zeroed)
            metrics["curriculum/step"] = float(step)
            metrics.update({_LEARNER_RENAME.get(k, k): v for k, v in lm.items()})
            step_s = time.perf_counter() - t_step
            metrics.update({"time/rollout": time_rollout, "time/reward": time_reward, "time/learner": time_learner,
                            "time/sync": sm["time/sync"], "sync/bytes": sm["sync/bytes"],
                            "sync/buckets": sm["sync/buckets"], "time/step_s": step_s,
                            "perf/tokens_per_s": gen_tokens / max(time_rollout, 1e-9),
                            "perf/learner_tokens_per_s": lm.get("tokens/replayed", 0.0) / max(time_learner, 1e-9),
                            "data/position": float((step + 1) * P)})
            done = step + 1
            if eval_examples and ((cfg.trainer.eval_every and done % cfg.trainer.eval_every == 0)
                                  or done == cfg.trainer.total_steps):
                t = time.perf_counter()
                results = evaluate(cfg, workers.rollout, tokenizer, eval_examples, step)
                metrics.update(eval_metrics(results))
                metrics["time/eval"] = time.perf_counter() - t
                logger.log_eval(step, results)
            row = logger.log(step, metrics)
            logger.log_samples(step, records, texts_c, prompts=[texts_p[i // G] for i in range(n_samples)],
                               num_layers=num_layers)
            if logger.should_log_mask(step):
                rec = next((r for r in records if r.num_rounds > 0), records[0])
                logger.log_mask_image(evicted_at(rec, num_layers), len(rec.prompt_ids), step,
                                      title=f"replay mask, step {step} (eps={rec.eviction_config.eps if rec.eviction_config else 0:g})")

            # 7. checkpoint
            if (cfg.trainer.save_every and done % cfg.trainer.save_every == 0) or done == cfg.trainer.total_steps:
                last_ckpt = _save(cfg, workers, ckpt, done, logger.run_id)
                logger.print(f"[rlmem] checkpoint {last_ckpt}")
        step = cfg.trainer.total_steps
    except KeyboardInterrupt:
        print(f"\n[rlmem] interrupted at step {step}; last complete checkpoint: {last_ckpt or 'none'} "
              f"(rerun the same command to resume)", file=sys.stderr, flush=True)
        raise
    except ray.exceptions.RayActorError as e:
        who = (workers.name_of(getattr(e, "actor_id", None)) if workers is not None else None) or "a Ray worker"
        raise TrainingError(f"{who} died during step {step}: {_first_line(e)}\nlast complete checkpoint: "
                            f"{last_ckpt or 'none'}; rerun with trainer.resume=auto to continue from it") from e
    finally:
        if logger is not None:
            logger.close()
        if started_ray:
            ray.shutdown()
        elif workers is not None:
            stop_workers(workers)

    summary = {"steps": step, "output_dir": str(out), "metrics_path": str(out / "metrics.jsonl"),
               "checkpoint": str(last_ckpt) if last_ckpt else None, "resumed_from": str(resume_dir) if resume_dir else None,
               "metrics": row, "nodes": nodes}
    print(f"[rlmem] done: {step} steps\n[rlmem] metrics:     {out / 'metrics.jsonl'}\n"
          f"[rlmem] samples:     {out / 'samples.jsonl'}\n[rlmem] checkpoint:  {last_ckpt}\n"
          f"[rlmem] HF weights:  {Path(last_ckpt) / ckpt.HF_SUBDIR if last_ckpt else None}\n"
          f"[rlmem] W&B (local): {out / 'wandb'}", flush=True)
    return summary


def _prompt_text(example: dict, tokenizer, cfg: RunConfig, eps: float | None) -> str:
    from rlmem.data.templates import build_prompt

    return build_prompt(example, tokenizer, template=cfg.data.template,
                        eviction_rate=eps if eps is not None and eps > 0 else None)


def _save(cfg: RunConfig, workers: Workers, ckpt, done: int, run_id: str) -> Path:
    """Engine state (every rank) + HF export, then the trainer state; rotation per ``keep_last``."""
    import ray

    def parts(paths) -> None:
        ray.get([lw.save_checkpoint.remote(str(paths.root), {"step": done}) for lw in workers.learners])
        ray.get([lw.export_hf.remote(str(paths.hf)) for lw in workers.learners])

    state = ckpt.TrainerState(step=done, data_position=done * cfg.algorithm.prompts_per_step, curriculum_step=done,
                              rng=ckpt.capture_rng_state(), wandb_run_id=run_id,
                              extra={"samples_per_step": cfg.batch_sizes().samples_per_step})
    return ckpt.save_checkpoint(cfg.output_path, state, parts, keep_last=cfg.trainer.keep_last)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__
