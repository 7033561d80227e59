"""The training driver: one NGC (Dr. GRPO) run on Ray, from a validated :class:`RunConfig`.

Steps are numbered from 1 everywhere (console, ``step`` in every JSON-lines log, figures,
checkpoint names): checkpoint ``step_000002`` holds the state after steps 1 and 2, and resuming
from it runs step 3 next. Each step (:func:`run_step`): take the next prompts (a pure function of
the step, so resume is exact) → ε per group (curriculum / interoception, tag in the prompt) →
rollouts on the rollout workers (each prompt repeated ``rollouts_per_prompt`` times, groups
contiguous) → decode → rewards → group advantages → (colocated: engines sleep) → learner
``train_step`` on data-parallel shards → (colocated: engines wake) → weight sync → metrics,
samples, pictures, evaluation → checkpoint. All randomness of a step is derived from
``(seed, step)``, so step N+1 of a resumed run equals step N+1 of an uninterrupted one.

With ``trainer.max_staleness: k ≥ 1`` the rollouts run ahead of the learner (docs/design.md
section 5, "The pipeline"): step ``m``'s rollouts are launched as soon as the engines hold the
weights after step ``max(0, m − 1 − k)``, so while the learner trains step ``n`` the engines generate
steps ``n+1 … n+k``; a checkpoint carries those already generated (:func:`checkpoint_if_due`). Every
phase's span goes to ``timeline.jsonl`` and ``figures/timeline.png`` (:mod:`rlmem.run.timeline`).

Before Ray starts: the environment checks (:mod:`rlmem.run.preflight`), the run-directory lock
and start plan (:mod:`rlmem.run.rundir`). SIGINT and SIGTERM (``ray job stop``) take the same
path: abandon the step, keep the last checkpoint, close W&B, stop Ray, exit 130 / 143.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rlmem.run.config import ConfigError, RunConfig
from rlmem.run.errors import TrainingError, first_line

__all__ = ["TrainingError", "Stopped", "run_training"]


class Stopped(KeyboardInterrupt):
    """Raised in the driver by SIGINT or SIGTERM; ``signum`` says which (exit code 128 + signum)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []   # signals seen: Ray turns an exception raised in ray.get into a bare KeyboardInterrupt


def _raise_stopped(signum, _frame):
    _received.append(signum)
    raise Stopped(signum)


def stop_signal(e: KeyboardInterrupt) -> int:
    """Which signal a KeyboardInterrupt stands for (the last one received; SIGINT if none)."""
    return getattr(e, "signum", None) or (_received[-1] if _received else signal.SIGINT)


def install_stop_handlers() -> None:
    """Route SIGINT and SIGTERM to :class:`Stopped` (main thread only). Called again after
    ``ray.init``: Ray's core installs a native SIGTERM handler that dumps a stack and aborts."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _raise_stopped)


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Stopped` inside; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    install_stop_handlers()
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@dataclass
class Run:
    """Everything the phases of a step share."""

    cfg: RunConfig
    tokenizer: Any
    examples: list[dict]
    eval_examples: list[dict]
    workers: Any
    logger: Any
    num_layers: int
    last_ckpt: Path | None
    current_step: int | None = None          # the step in progress, None between steps
    row: dict[str, Any] = field(default_factory=dict)
    sync_path: str = "object_store"          # rlmem.train.weight_sync.PATHS
    sleep_note: str | None = None            # why engines did not sleep (printed once)
    pending: dict[int, "Rollouts"] = field(default_factory=dict)   # later steps' rollouts (max_staleness)
    run_start: float = field(default_factory=time.time)              # unix time this leg started (timeline)
    spans: list[dict[str, Any]] = field(default_factory=list)       # the step's timeline rows, not yet logged
    last_logged: float = field(default_factory=time.perf_counter)   # when the previous step was logged


@dataclass
class Batch:
    """One step's prompts: per group the example, its ε, its prompt text; per sample the ids and config."""

    step: int
    examples: list[dict]
    eps: list[float]
    prompt_texts: list[str]
    prompt_ids: list[list[int]]           # per sample (group-major)
    eviction: list[Any]                   # per sample EvictionConfig or None


@dataclass
class Rollouts:
    """One step's rollouts: launched (``refs``) or arrived (``records``), and which weights sampled them."""

    batch: Batch
    sampled_by: int                       # the step whose weights sampled them (0: the starting weights)
    refs: list | None = None
    records: list | None = None
    new_tokens: float = 0.0
    seconds: float = 0.0                  # generation wall time (first worker start to last worker end)
    spans: list[tuple[float, float]] = field(default_factory=list)   # per rollout worker, unix seconds


def sampler_step(step: int, max_staleness: int) -> int:
    """The step whose weights sample step ``step``'s rollouts (docs/design.md section 5)."""
    return max(0, step - 1 - max_staleness)


def run_training(cfg: RunConfig, *, rollout_resources: dict[str, float] | None = None,
                 learner_resources: dict[str, float] | None = None) -> dict[str, Any]:
    """Train per ``cfg``; return a summary (steps, last metrics, paths). See the module docstring.

    ``rollout_resources`` / ``learner_resources`` default to ``ray.rollout_resources`` /
    ``ray.learner_resources`` (custom Ray resources that pin each role to its nodes)."""
    from rlmem.run.preflight import preflight
    from rlmem.run.rundir import RunDirLock

    _received.clear()
    prepared, problems = preflight(cfg)
    if problems:
        raise ConfigError(problems)
    with stop_signals():
        lock = RunDirLock(cfg.output_path).acquire()
        try:
            return _run_locked(cfg, prepared, lock,
                               cfg.ray.rollout_resources if rollout_resources is None else rollout_resources,
                               cfg.ray.learner_resources if learner_resources is None else learner_resources)
        finally:
            lock.release()


def _run_locked(cfg: RunConfig, prepared, lock, rollout_resources, learner_resources) -> dict[str, Any]:
    import ray

    from rlmem.models.loading import load_tokenizer
    from rlmem.run import checkpoint as ckpt
    from rlmem.run.logger import RunLogger
    from rlmem.run.preflight import resolve_model_path
    from rlmem.run.rundir import apply_plan, describe_holder, plan_start
    from rlmem.train.weight_sync import sync_weights
    from rlmem.train.workers import init_ray, start_workers, stop_workers, worker_nodes

    out = cfg.output_path
    plan = plan_start(cfg)
    if lock.took_over:
        print(f"[rlmem] took over a stale lock ({describe_holder(lock.took_over)}: not running)", flush=True)
    print(f"[rlmem] {out}: {plan.describe()}", flush=True)
    if plan.resume_from is not None and plan.step >= cfg.trainer.total_steps:
        print(f"[rlmem] {plan.resume_from} already has {plan.step} >= trainer.total_steps={cfg.trainer.total_steps} "
              f"steps; nothing to do", flush=True)
        return {"steps": plan.step, "resumed_from": str(plan.resume_from), "output_dir": str(out), "metrics": None,
                "checkpoint": str(plan.resume_from)}
    state = ckpt.load_trainer_state(plan.resume_from) if plan.resume_from else ckpt.TrainerState(step=0)
    trimmed = _logged_past(out, plan.step)
    apply_plan(cfg, plan)
    try:
        model_path = resolve_model_path(cfg)
        tokenizer = load_tokenizer(model_path)
    except Exception as e:  # noqa: BLE001 - the hub and the loaders raise many types
        raise TrainingError(f"model.path {cfg.model.path!r}: cannot load: {first_line(e)}", exit_code=2) from None

    started_ray = init_ray(cfg)
    install_stop_handlers()
    run: Run | None = None
    workers = logger = None
    try:
        t0 = time.perf_counter()
        workers = start_workers(cfg, model_path, rollout_resources=rollout_resources,
                                learner_resources=learner_resources)
        num_layers = ray.get(workers.rollout[0].info.remote())["num_layers"]
        nodes = worker_nodes(workers)
        if plan.resume_from is not None:
            ray.get([lw.load_checkpoint.remote(str(plan.resume_from)) for lw in workers.learners])
            if state.rng:
                ckpt.restore_rng_state(state.rng)
        path = prepare_weight_sync(cfg, workers)
        # Rollout workers start from the learner's weights (also after resume, and when dtypes differ).
        sync0 = sync_weights(workers.learners, workers.rollout, bucket_mb=cfg.ray.weight_sync_bucket_mb,
                             timeout_s=cfg.ray.weight_sync_timeout_s, worker_names=workers.rollout_names, path=path)
        logger = RunLogger.from_config(cfg, run_id=state.wandb_run_id, start_step=plan.step, rewind=trimmed)
        run = Run(cfg, tokenizer, prepared.train_examples, prepared.eval_examples, workers, logger, num_layers,
                  plan.resume_from, sync_path=path)
        bs = cfg.batch_sizes()
        logger.print(f"[rlmem] {'resumed from ' + str(plan.resume_from) if plan.resume_from else 'new run'}; "
                     f"{bs.prompts_per_step} prompts x {bs.rollouts_per_prompt} rollouts = {bs.samples_per_step} "
                     f"samples/step on {bs.rollout_workers} rollout + {bs.learner_workers} learner workers; "
                     f"start-up {time.perf_counter() - t0:.1f}s (weight sync {sync0['time/sync']:.2f}s, "
                     f"{path.replace('_', ' ')}; placement {cfg.ray.placement})")
        start_pipeline(run, plan.step, plan.resume_from)
        for step in range(plan.step + 1, cfg.trainer.total_steps + 1):
            run.current_step = step
            run_step(run, step)
            run.current_step = None
        logger.draw_timeline(cfg.trainer.total_steps)
    except KeyboardInterrupt as e:
        signum = stop_signal(e)
        where = (f"during step {run.current_step}" if run and run.current_step
                 else "while starting" if run is None else "between steps")
        last = (run.last_ckpt if run else plan.resume_from) or "none"
        print(f"\n[rlmem] interrupted ({signal.Signals(signum).name}) {where}; last complete checkpoint: {last} "
              f"(rerun the same command to resume)", file=sys.stderr, flush=True)
        raise Stopped(signum) from None
    except ray.exceptions.RayActorError as e:
        who = (workers.name_of(getattr(e, "actor_id", None)) if workers is not None else None) or "a Ray worker"
        where = f"during step {run.current_step}" if run and run.current_step else "while starting"
        last = (run.last_ckpt if run else plan.resume_from) or "none"
        raise TrainingError(f"{who} died {where}: {first_line(e)}\nlast complete checkpoint: {last}; rerun with "
                            f"trainer.resume=auto to continue from it") from e
    finally:
        with _ignoring(Stopped):   # a second Ctrl-C must not skip the clean-up
            if logger is not None:
                logger.close()
            if workers is not None:
                stop_workers(workers)
            if started_ray:
                ray.shutdown()

    last = run.last_ckpt
    print(f"[rlmem] done: {cfg.trainer.total_steps} steps\n[rlmem] metrics:     {out / 'metrics.jsonl'}\n"
          f"[rlmem] samples:     {out / 'samples.jsonl'}\n[rlmem] checkpoint:  {last}\n"
          f"[rlmem] HF weights:  {Path(last) / ckpt.HF_SUBDIR if last else None}\n"
          f"[rlmem] W&B (local): {out / 'wandb'}", flush=True)
    return {"steps": cfg.trainer.total_steps, "output_dir": str(out), "metrics_path": str(out / "metrics.jsonl"),
            "checkpoint": str(last) if last else None,
            "resumed_from": str(plan.resume_from) if plan.resume_from else None, "metrics": run.row, "nodes": nodes}


@contextmanager
def _ignoring(exc: type[BaseException]) -> Iterator[None]:
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    for s in old:
        signal.signal(s, signal.SIG_IGN)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _logged_past(out: Path, step: int) -> bool:
    """Whether metrics.jsonl has rows after ``step`` (then W&B has them too and must be rewound)."""
    from rlmem.run.logger import read_metrics

    try:
        return any(int(r.get("step", 0)) > step for r in read_metrics(out))
    except (ValueError, OSError):
        return True


# ----------------------------------------------------------------------------------------------
# One step, phase by phase


def run_step(run: Run, step: int) -> None:
    """Step ``step`` (1-based): prompts → rollouts → rewards → learner → weight sync → logs → checkpoint.

    With ``max_staleness`` k ≥ 1 the rollouts were launched earlier (:func:`start_pipeline`,
    :func:`launch_ahead`) and only arrive here; the learner step overlaps the later steps' rollouts."""
    t_step = time.perf_counter()
    ro = run.pending.pop(step, None)
    t = time.perf_counter()
    if ro is None:   # on-policy: sampled now, by the weights after the previous step (what the engines hold)
        ro = launch_rollouts(run, step, step - 1)
    batch, (records, gen_tokens) = ro.batch, arrive(ro)
    time_wait = time.perf_counter() - t
    time_rollout = ro.seconds if run.cfg.trainer.max_staleness else time_wait
    run.spans += [_span(run, step, name, "rollout", a, b) for name, (a, b) in zip(run.workers.rollout_names, ro.spans)]
    t, t_wall = time.perf_counter(), time.time()
    texts, rewards, verifier, advantages, zeroed = score(run, batch, records)
    time_reward = time.perf_counter() - t
    run.spans.append(_span(run, step, "driver", "reward", t_wall, time.time()))
    learner_metrics, sync, times = learn_and_sync(run, records, advantages)
    times["time/rollout_wait"] = time_wait + times.pop("time/drain", 0.0)
    metrics = step_metrics(run, batch, records, rewards, verifier, zeroed, learner_metrics, sync, gen_tokens,
                           {"time/rollout": time_rollout, "time/reward": time_reward, **times,
                            "time/step_s": time.perf_counter() - t_step})
    eval_results = evaluate_if_due(run, step, metrics)
    launch_ahead(run, step)
    log_step(run, batch, records, texts, metrics, eval_results)
    checkpoint_if_due(run, step)


def launch_rollouts(run: Run, step: int, sampled_by: int) -> Rollouts:
    """Start step ``step``'s rollouts on the rollout workers (which hold the weights after ``sampled_by``)."""
    from rlmem.train.rollouts import launch, sampling_params, step_seed

    cfg, batch = run.cfg, make_batch(run, step)
    refs = launch(run.workers.rollout, batch.prompt_ids, batch.eviction,
                  lambda i: sampling_params(cfg, step_seed(cfg.seed, step, i)))
    return Rollouts(batch, sampled_by, refs=refs)


def arrive(ro: Rollouts) -> tuple[list, float]:
    """Wait for launched rollouts (once); each record says which weights sampled it."""
    from rlmem.train.rollouts import collect

    if ro.records is None:
        ro.records, ro.new_tokens, ro.spans = collect(ro.refs)
        ro.refs = None
        ro.seconds = max(b for _, b in ro.spans) - min(a for a, _ in ro.spans)
        for r in ro.records:
            r.extra["sampled_by_step"] = ro.sampled_by
    return ro.records, ro.new_tokens


def start_pipeline(run: Run, done: int, resume_from: Path | None) -> None:
    """``max_staleness`` k ≥ 1, before the first step of this leg: the rollouts of steps ``done+1 …
    done+1+k``. A checkpoint carries those sampled by weights older than it (:func:`checkpoint_if_due`);
    the others are launched now on the weights the engines hold, the weights after step ``done``."""
    from rlmem.run.checkpoint import load_inflight

    k, total = run.cfg.trainer.max_staleness, run.cfg.trainer.total_steps
    if not k:
        return
    try:
        saved = load_inflight(resume_from) if resume_from is not None else {}
    except (OSError, ValueError) as e:
        raise TrainingError(f"{resume_from}: cannot read its in-flight rollouts: {first_line(e)}") from None
    newer = []
    for m in range(done + 1, min(done + 1 + k, total) + 1):
        if m in saved:
            records, meta = saved[m]
            run.pending[m] = Rollouts(make_batch(run, m), int(meta["sampled_by_step"]), records=records,
                                      new_tokens=float(meta["new_tokens"]), seconds=float(meta["seconds"]))
            for r in records:
                r.extra["sampled_by_step"] = int(meta["sampled_by_step"])
        else:
            newer += [m] if sampler_step(m, k) != done else []
            run.pending[m] = launch_rollouts(run, m, done)
    if newer:
        run.logger.print(f"[rlmem] warning: {resume_from} carries no rollouts for steps {newer} (saved with another "
                         f"trainer.max_staleness, or at its last step): sampled now by the weights after step {done}, "
                         f"newer than the rule's (docs/design.md section 5)")


def launch_ahead(run: Run, step: int) -> None:
    """After the weight sync of ``step`` (and its evaluation): launch the rollouts these weights
    sample, those of step ``step + 1 + k`` (max_staleness k ≥ 1; k = 0 samples at the step's start)."""
    k = run.cfg.trainer.max_staleness
    m = step + 1 + k
    if k and m <= run.cfg.trainer.total_steps and m not in run.pending:
        run.pending[m] = launch_rollouts(run, m, step)


def _span(run: Run, step: int, actor: str, phase: str, start: float, end: float) -> dict[str, Any]:
    from rlmem.run.timeline import span

    return span(step, actor, phase, start, end, run.run_start)


def _learner_names(run: Run) -> list[str]:
    return [f"learner rank {r}" for r in range(len(run.workers.learners))]


def make_batch(run: Run, step: int) -> Batch:
    """The step's prompts (stream position ``(step-1) * P``) and each group's ε."""
    from rlmem.data.stream import prompt_indices
    from rlmem.evaluation.tasks import prompt_text
    from rlmem.train.curriculum import group_eps, stage_at

    cfg, tok = run.cfg, run.tokenizer
    P, G = cfg.algorithm.prompts_per_step, cfg.algorithm.rollouts_per_prompt
    done = step - 1
    exs = [run.examples[i] for i in prompt_indices(done * P, P, len(run.examples), cfg.seed, cfg.data.shuffle)]
    eps = group_eps(cfg.eviction, P, done, cfg.seed)
    tagged = cfg.eviction.interoception.enabled
    texts = [prompt_text(ex, tok, cfg.data.template, eviction_rate=e if tagged and e > 0 else None)
             for ex, e in zip(exs, eps)]
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    tau = stage_at(cfg.eviction, step).get("tau")
    ev = [cfg.eviction_config(e, tau) if e > 0 else None for e in eps]
    return Batch(step, exs, eps, texts, [ids[g] for g in range(P) for _ in range(G)],
                 [ev[g] for g in range(P) for _ in range(G)])


def score(run: Run, batch: Batch, records: list):
    """Decode, reward (verifier + shaping), the min-length rule, group advantages."""
    import torch

    from rlmem.evaluation.tasks import completion_text
    from rlmem.learner.loss import group_advantages
    from rlmem.train.rollouts import compute_rewards

    cfg, G = run.cfg, run.cfg.algorithm.rollouts_per_prompt
    texts = [completion_text(run.tokenizer, r.completion_ids) for r in records]
    rows = [ex for ex in batch.examples for _ in range(G)]
    rewards, verifier = compute_rewards(cfg, texts, rows, [p for p in batch.prompt_texts for _ in range(G)])
    zeroed = 0
    if cfg.algorithm.min_length_rule:
        for i, r in enumerate(records):
            if r.eviction_config is not None and r.num_rounds == 0 and rewards[i] != 0.0:
                rewards[i], zeroed = 0.0, zeroed + 1
    for r, v in zip(records, rewards):
        r.reward = v
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), G, scale_by_std=cfg.algorithm.scale_by_std)
    return texts, rewards, verifier, adv, zeroed


def learn(run: Run, records: list, advantages) -> dict[str, float]:
    """One learner ``train_step`` over data-parallel shards (every rank returns the same metrics)."""
    import ray

    from rlmem.train.rollouts import split_even

    n = len(records)
    # A rollout the engine preempted and recomputed (vLLM, with a full cache) is no longer the
    # trajectory the policy chose: it leaves the batch (counted in rollout/preempted_dropped, warned).
    keep = [i for i, r in enumerate(records) if not r.extra.get("preempted")]
    if len(keep) < n:
        print(f"[rlmem] warning: {n - len(keep)} preempted rollouts dropped from the learner batch "
              "(give the vLLM engine more KV blocks or fewer concurrent sequences)")
    parts = len(run.workers.learners)
    shards = split_even(keep, parts) if len(keep) == n else [keep[i::parts] for i in range(parts)]
    ms = ray.get([lw.train_step.remote([records[i] for i in s], advantages[s].tolist(), n)
                  for lw, s in zip(run.workers.learners, shards)])
    for name, m in zip(_learner_names(run), ms):   # each rank's own span, for the timeline
        run.spans.append(_span(run, run.current_step or 0, name, "learner", m.pop("timeline/started"),
                               m.pop("timeline/ended")))
    return ms[0]


def learn_and_sync(run: Run, records: list, advantages) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """The learner step and the weight sync, in the order a placement needs.

    Colocated (rollout worker i and learner rank i share GPU i): the engines sleep before the
    learner step (vLLM frees its weights and KV cache), the learners hand their freed step memory
    back, the engines wake and load the new weights before the next rollout. Split: learn, sync.
    With ``max_staleness`` ≥ 1 the rollouts in flight finish before the sync (a sync sent now would
    queue behind them anyway; ``time/drain`` is the wait), and engines never sleep: the config refuses
    it on GPUs, and on CPUs a sleep call would queue behind the rollouts and serialise the steps.
    Returns (learner metrics, sync metrics, times)."""
    import ray

    from rlmem.run.timeline import overlap_fraction

    colocated = run.cfg.ray.placement == "colocated" and not run.cfg.trainer.max_staleness
    times: dict[str, float] = {}
    if colocated:
        t = time.perf_counter()
        notes = ray.get([rw.sleep.remote() for rw in run.workers.rollout])
        times["time/engine_sleep"] = time.perf_counter() - t
        note = next((n for n in notes if n), None)
        if note and note != run.sleep_note:
            run.sleep_note = note
            run.logger.print(f"[rlmem] colocated: rollout engines do not sleep during the learner step: {note}")
    t = time.perf_counter()
    learner_metrics = learn(run, records, advantages)
    times["time/learner"] = time.perf_counter() - t
    learner_span = next((r["start"], r["end"]) for r in reversed(run.spans) if r["phase"] == "learner")
    if colocated:
        t = time.perf_counter()
        ray.get([lw.free_cached_memory.remote() for lw in run.workers.learners])
        ray.get([rw.wake_up.remote() for rw in run.workers.rollout])
        times["time/engine_wake"] = time.perf_counter() - t
    t = time.perf_counter()
    for ro in run.pending.values():
        arrive(ro)
    times["time/drain"] = time.perf_counter() - t
    beside = [(a - run.run_start, b - run.run_start) for ro in run.pending.values() for a, b in ro.spans]
    times["time/overlap"] = overlap_fraction(learner_span, beside)
    t_wall = time.time()
    sync = sync_rollout_weights(run)
    step = run.current_step or 0
    run.spans += [_span(run, step, name, "sync", t_wall, time.time())
                  for name in _learner_names(run) + run.workers.rollout_names]
    return learner_metrics, sync, times


def prepare_weight_sync(cfg: RunConfig, workers) -> str:
    """The weight-sync path (``ray.weight_sync``; ``auto`` by the learner's device and the placement);
    ``broadcast`` forms its process group here, once (NCCL when the learner is on a GPU, else gloo)."""
    import ray

    from rlmem.train.weight_sync import choose_path, setup_weight_group

    on_cuda = bool(ray.get(workers.learners[0].weights_on_cuda.remote()))
    path = choose_path(cfg.ray.weight_sync, placement=cfg.ray.placement, learner_on_cuda=on_cuda)
    if path == "broadcast":
        setup_weight_group(workers.learners[0], workers.rollout, backend="nccl" if on_cuda else "gloo",
                           timeout_s=cfg.ray.weight_sync_timeout_s)
    return path


def sync_rollout_weights(run: Run) -> dict[str, float]:
    from rlmem.train.weight_sync import sync_weights

    r = run.cfg.ray
    return sync_weights(run.workers.learners, run.workers.rollout, bucket_mb=r.weight_sync_bucket_mb,
                        timeout_s=r.weight_sync_timeout_s, worker_names=run.workers.rollout_names,
                        path=run.sync_path)


LEARNER_METRIC_NAMES = {"grad_norm": "optim/grad_norm", "lr": "optim/lr", "global_step": "optim/global_step",
                        "optimizer_steps": "optim/steps", "time/train_step": "learner/time_train_step",
                        "time/replay_forward": "learner/time_replay_forward", "time/backward": "learner/time_backward",
                        "time/optimizer": "learner/time_optimizer"}


def step_metrics(run: Run, batch: Batch, records, rewards, verifier, zeroed, lm, sync, gen_tokens,
                 times: dict[str, float]) -> dict[str, float]:
    from rlmem.train.rollouts import rollout_metrics

    P = run.cfg.algorithm.prompts_per_step
    m = rollout_metrics(records, rewards, verifier, [e if e > 0 else 0.0 for e in batch.eps], run.num_layers)
    m["reward/zeroed_before_first_round"] = float(zeroed)
    taus = [ev.tau for ev in batch.eviction if ev is not None]
    if taus:
        m["eviction/tau"] = float(taus[0])   # one τ per step (the policy batches one τ: rlmem.eviction.policy)
    m["rollout/preempted_dropped"] = float(sum(bool(r.extra.get("preempted")) for r in records))
    # updates between the weights that sampled a record and those that train on it (after step N-1)
    stale = [batch.step - 1 - int(r.extra["sampled_by_step"]) for r in records]
    m["rollout/staleness_mean"], m["rollout/staleness_max"] = float(sum(stale) / len(stale)), float(max(stale))
    m.update({LEARNER_METRIC_NAMES.get(k, k): v for k, v in lm.items()})
    m.update(times)
    m.update({"time/sync": sync["time/sync"], "sync/bytes": sync["sync/bytes"], "sync/buckets": sync["sync/buckets"],
              "perf/tokens_per_s": gen_tokens / max(times["time/rollout"], 1e-9),
              "perf/learner_tokens_per_s": lm.get("tokens/replayed", 0.0) / max(times["time/learner"], 1e-9),
              "data/position": float(batch.step * P)})
    return m


def evaluate_if_due(run: Run, step: int, metrics: dict[str, float]) -> list[dict] | None:
    """The evaluation pipeline (rlmem/evaluation) on the rollout workers, after the weight sync: one
    result row per run (full, then the policy at each ``eval.eps``), as ``rlmem eval`` would give for
    this step's checkpoint with the same settings and seed (:func:`rlmem.train.rollouts.eval_plan`)."""
    from rlmem.evaluation.pipeline import EvalError, evaluate
    from rlmem.train.rollouts import WorkerExecutor, eval_metrics, eval_plan

    t = run.cfg.trainer
    if not run.eval_examples or not ((t.eval_every and step % t.eval_every == 0) or step == t.total_steps):
        return None
    t0, t_wall = time.perf_counter(), time.time()
    try:
        results = evaluate(eval_plan(run.cfg, step), run.eval_examples, run.tokenizer,
                           WorkerExecutor(run.workers.rollout))
    except EvalError as e:
        raise TrainingError(f"evaluation at step {step}: {e}") from None
    metrics.update(eval_metrics(results))
    metrics["time/eval"] = time.perf_counter() - t0
    names = getattr(run.workers, "rollout_names", None) or [f"rollout worker {i}" for i in range(len(run.workers.rollout))]
    run.spans += [_span(run, step, name, "eval", t_wall, time.time()) for name in names]
    return results


def log_step(run: Run, batch: Batch, records, texts, metrics, eval_results) -> None:
    """metrics.jsonl / W&B row, eval rows, sample table, replay-mask picture, timeline: all tagged ``batch.step``."""
    from rlmem.eviction.record import evicted_at

    lg, step, G = run.logger, batch.step, run.cfg.algorithm.rollouts_per_prompt
    now, t_wall = time.perf_counter(), time.time()
    metrics["perf/steps_per_hour"] = 3600.0 / max(now - run.last_logged, 1e-9)
    run.last_logged = now
    if eval_results is not None:
        lg.log_eval(step, eval_results)
    lg.log_samples(step, records, texts, prompts=[batch.prompt_texts[i // G] for i in range(len(records))],
                   num_layers=run.num_layers)
    if lg.should_log_records(step):
        lg.log_records(step, records)
    if lg.should_log_mask(step):
        rec = next((r for r in records if r.num_rounds > 0), records[0])
        eps = rec.eviction_config.eps if rec.eviction_config else 0
        lg.log_mask_image(evicted_at(rec, run.num_layers), len(rec.prompt_ids), step,
                          title=f"replay mask, step {step} (eps={eps:g})")
    run.row = lg.log(step, metrics)
    lg.log_timeline([*run.spans, _span(run, step, "driver", "log", t_wall, time.time())])
    run.spans = []
    if lg.should_log_mask(step):
        lg.draw_timeline(step)


def checkpoint_if_due(run: Run, step: int) -> None:
    """After ``save_every`` steps and at the end: engine state (every rank), HF export, the rollouts
    already generated by older weights (max_staleness ≥ 1: steps ``step+1 … step+k``; a resume cannot
    sample them again), trainer state, the resolved config, then the manifest
    (:func:`rlmem.run.checkpoint.save_checkpoint`)."""
    import ray

    from rlmem.run import checkpoint as ckpt

    cfg, t = run.cfg, run.cfg.trainer
    if not ((t.save_every and step % t.save_every == 0) or step == t.total_steps):
        return

    def parts(paths) -> None:
        ray.get([lw.save_checkpoint.remote(str(paths.root), {"step": step}) for lw in run.workers.learners])
        ray.get([lw.export_hf.remote(str(paths.hf)) for lw in run.workers.learners])
        ckpt.save_inflight(paths, {m: (ro.records, {"sampled_by_step": ro.sampled_by, "new_tokens": ro.new_tokens,
                                                    "seconds": ro.seconds})
                                   for m, ro in sorted(run.pending.items()) if ro.sampled_by < step})

    state = ckpt.TrainerState(step=step, rng=ckpt.capture_rng_state(), wandb_run_id=run.logger.run_id,
                              extra={"samples_per_step": cfg.batch_sizes().samples_per_step})
    t_wall = time.time()
    run.last_ckpt = ckpt.save_checkpoint(cfg.output_path, state, parts, keep_last=t.keep_last,
                                         config_yaml=cfg.to_yaml())
    run.logger.log_timeline([_span(run, step, name, "checkpoint", t_wall, time.time()) for name in _learner_names(run)])
    run.logger.print(f"[rlmem] checkpoint {run.last_ckpt}")
