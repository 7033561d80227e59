"""The per-step pieces of training: prompts, generation fan-out over the rollout workers, rewards,
the step's rollout metrics, and the rollout workers as the evaluation pipeline's executor.

Prompt text, decoding and grading are the evaluation pipeline's (:mod:`rlmem.evaluation.tasks`),
so a training reward and an evaluation score of the same completion are the same number. Only
:func:`launch`, :func:`collect` and :class:`WorkerExecutor` talk to Ray (the workers' ``generate``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from rlmem.engine.sampling import SAMPLING_FIELDS, SamplingParams
from rlmem.evaluation.executor import GenerationJob
from rlmem.evaluation.pipeline import EvalPlan
from rlmem.eviction.policy import EvictionConfig
from rlmem.run.config import RunConfig
from rlmem.run.errors import TrainingError


def step_seed(seed: int, step: int, worker: int) -> int:
    """The sampling seed of rollout worker ``worker`` at ``step`` (token and eviction sampling)."""
    return int(np.random.default_rng([seed & 0xFFFFFFFF, step, worker, 0x5EED]).integers(0, 2**62))


def split_even(items: list, parts: int) -> list[list]:
    """Contiguous, equal-sized parts (the config checked divisibility); groups stay contiguous."""
    n = len(items) // parts
    return [items[i * n:(i + 1) * n] for i in range(parts)]


def sampling_params(cfg: RunConfig, seed: int) -> SamplingParams:
    """The rollouts' sampling (the ``rollout`` section's SamplingParams fields) with ``seed``."""
    return SamplingParams.from_fields({k: getattr(cfg.rollout, k) for k in SAMPLING_FIELDS}, seed)


def launch(workers: list, prompt_ids: list[list[int]], eviction: list[EvictionConfig | None],
           make_sampling, *, greedy: bool = False) -> list:
    """Start one rollout per prompt, split contiguously over ``workers`` (worker ``i`` samples with
    ``make_sampling(i)``); returns the Ray object refs without waiting, so the driver can run the
    learner meanwhile (docs/design.md section 5). A worker runs its calls in order: a weight sync
    sent after this call lands after these rollouts, so each record is sampled by one weight version."""
    n = len(workers)
    return [w.generate.remote(p, make_sampling(i), c, greedy)
            for i, (w, p, c) in enumerate(zip(workers, split_even(prompt_ids, n), split_even(eviction, n)))]


def collect(refs: list) -> tuple[list, float, list[tuple[float, float]]]:
    """Wait for :func:`launch`'s calls: the records in prompt order, the generated token count, and
    each worker's generation span (unix seconds, as the worker measured it)."""
    import ray

    results = ray.get(refs)
    return ([r for recs, _ in results for r in recs], sum(s["new_tokens"] for _, s in results),
            [(s["started"], s["ended"]) for _, s in results])


def compute_rewards(cfg: RunConfig, texts: list[str], examples: list[dict], prompts: list[str]
                    ) -> tuple[list[float], list[float]]:
    """The configured verifier plus the weighted shaping rewards, each graded by the evaluation
    pipeline's grader (:func:`rlmem.evaluation.tasks.grade`: TRL-style, the example columns as
    lists). Returns ``(total, verifier)``: accuracy is measured on the verifier alone."""
    from rlmem.evaluation.tasks import grade

    def call(name: str, kwargs: dict) -> list[float]:
        try:
            return grade(examples, texts, prompts, reward=name, reward_kwargs=kwargs)
        except ValueError as e:
            raise TrainingError(str(e)) from None

    verifier = call(cfg.data.reward, cfg.data.reward_kwargs)
    total = list(verifier)
    for sh in cfg.data.shaping:
        total = [t + sh.weight * v for t, v in zip(total, call(sh.name, sh.kwargs))]
    return total, verifier


def rollout_metrics(records: Sequence[Any], rewards: list[float], verifier: list[float], group_eps: list[float],
                    num_layers: int) -> dict[str, float]:
    """Reward (with shaping), accuracy (verifier alone), lengths and eviction statistics of one step.

    ``eviction/kv_saving_vs_own_length`` is each rollout's full-cache peak *for its own length* over
    its measured peak: what eviction saved on the sequence actually generated. It is not the
    design's peak-KV reduction (whose baseline is a separate no-eviction run's length); evaluation
    measures that one (``eval/eps_*/peak_kv_reduction``).
    """
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
        "eviction/kv_saving_vs_own_length": peak_kv_reduction(prm.astype(int).tolist(), comp.astype(int).tolist(),
                                                              peaks),
    }


# ----------------------------------------------------------------------------------------------
# Evaluation: the pipeline of rlmem/evaluation, with the rollout workers as its executor


class WorkerExecutor:
    """The evaluation pipeline's executor on the run's rollout workers: job ``i`` of a batch goes to
    worker ``i mod W`` (a job carries its own seed, so its records do not depend on the worker).

    ``workers`` are Ray actor handles of :class:`~rlmem.train.actors.RolloutWorker`, or the plain
    objects in-process (the class is usable without Ray).
    """

    def __init__(self, workers: list):
        if not workers:
            raise ValueError("WorkerExecutor needs at least one rollout worker")
        self.workers = list(workers)
        self.parallel = len(self.workers)

    def generate(self, jobs: list[GenerationJob]) -> list[list]:
        calls = [(self.workers[i % len(self.workers)], j) for i, j in enumerate(jobs)]
        args = [(j.prompt_ids, j.sampling, [j.eviction] * len(j.prompt_ids), True) for _, j in calls]
        if all(hasattr(w.generate, "remote") for w, _ in calls):
            import ray

            out = ray.get([w.generate.remote(*a) for (w, _), a in zip(calls, args)])
        else:
            out = [w.generate(*a) for (w, _), a in zip(calls, args)]
        return [recs for recs, _ in out]


def eval_plan(cfg: RunConfig, step: int) -> EvalPlan:
    """What the run evaluates at ``step``: the full cache and the run's scorer at every ε of
    ``eval.eps``, the step's schedule (τ of its stage), the ``eval`` section's sampling, the
    run's template, interoception and verifier (``data.reward`` alone: shaping is a training
    signal, not a score). The seed is the run's ``seed`` at every step, so successive evaluations
    share their random numbers and ``rlmem eval --seed SEED`` on a checkpoint reproduces its rows."""
    from rlmem.train.curriculum import stage_at

    e = cfg.eval
    schedule = cfg.eviction_config(tau=stage_at(cfg.eviction, step).get("tau"))
    sampling = {k: getattr(e, k) for k in SAMPLING_FIELDS}
    if sampling["max_new_tokens"] is None:
        sampling["max_new_tokens"] = cfg.rollout.max_new_tokens
    if sampling["stop"] is None:
        sampling["stop"] = list(cfg.rollout.stop)
    eps = sorted({float(x) for x in e.eps} - {0.0})
    return EvalPlan(runs=(("full", 0.0), *((schedule.scorer, x) for x in eps)), schedule=schedule, n=e.num_samples,
                    seed=cfg.seed, batch_size=e.batch_size, sampling=sampling, template=cfg.data.template,
                    interoception=cfg.eviction.interoception.enabled, reward=cfg.data.reward,
                    reward_kwargs=dict(cfg.data.reward_kwargs), ks=tuple(e.k))


def eval_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Flatten result rows into ``eval/eps_{ε}/{name}`` metrics for metrics.jsonl and W&B (one
    method per ε in training, so ε names the row); text and missing values are left out."""
    return {f"eval/eps_{r['eps']:g}/{k}": float(v) for r in rows for k, v in r.items()
            if k not in ("eps", "method") and isinstance(v, (int, float)) and not isinstance(v, bool)}
