"""The one evaluation pipeline: problems × runs → samples → grades → cells → result rows.

``rlmem eval`` (:func:`rlmem.evaluation.runner.run_eval`: a local engine, a resumable run
directory) and the in-training evaluation (``rlmem/train/driver.py``: the Ray rollout workers, the
cells in memory) both describe what to evaluate as an :class:`EvalPlan`, sample it with
:func:`sample` through an :class:`~rlmem.evaluation.executor.Executor`, and turn the cells into
rows with :func:`result_rows`. So a row of ``eval.jsonl`` and a row of ``results.json`` for the same
model, plan and seed are the same row (tests/test_evaluation.py checks it).

Runs are ``full`` (always first: it is the baseline of the peak-KV reduction) then every
``method × ε``, all behind the plan's schedule with deterministic top-k evictions (evaluation
mode, docs/design.md section 1).

Sampling, and the pairing rule (docs/evaluation.md, "Pairing"). Problems are processed in fixed
chunks of ``max(1, batch_size // n)`` problems, ``n`` samples each, generated together as one
job. A chunk's sampling seed depends only on ``(seed, chunk index)``, the same for every run, so:

* sample ``j`` of a method and sample ``j`` of ``full`` on the same problem share their random
  numbers (common random numbers): the peak-KV reduction pairs exactly those two, and method
  comparisons are less noisy;
* a resumed ``rlmem eval`` regenerates exactly the cells an uninterrupted one would have;
* the records do not depend on which worker ran a job, nor on how many workers there are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from rlmem.engine.sampling import SamplingParams
from rlmem.evaluation.executor import Executor, GenerationJob
from rlmem.evaluation.store import Cell, CellStore, run_name
from rlmem.eviction.policy import EvictionConfig

# Evaluation's sampling defaults, where they differ from SamplingParams' neutral ones on purpose:
# T = 0.6 and top-p 0.95 are the usual settings for evaluating reasoning models (DeepSeek-R1's
# recommendation), a little sharper than the training temperature. `rlmem eval`'s flags and the
# run config's `eval` section both take them from here.
EVAL_SAMPLING_DEFAULTS: dict[str, Any] = {"temperature": 0.6, "top_p": 0.95}


class EvalError(ValueError):
    """Settings that cannot run (the message names the option)."""


def eval_sampling_default(name: str) -> Any:
    """The evaluation default of a sampling field: :data:`EVAL_SAMPLING_DEFAULTS`, else SamplingParams'."""
    if name in EVAL_SAMPLING_DEFAULTS:
        return EVAL_SAMPLING_DEFAULTS[name]
    f = SamplingParams.__dataclass_fields__[name]
    return f.default_factory() if callable(f.default_factory) else f.default


@dataclass(frozen=True)
class EvalPlan:
    """Everything that determines an evaluation's samples and rows, whoever runs it."""

    runs: tuple[tuple[str, float], ...]        # (method, ε), ("full", 0.0) first
    schedule: EvictionConfig                   # δ, b, w, protect_recent, transform, τ; each run sets ε and scorer
    n: int                                     # samples per problem
    seed: int
    batch_size: int                            # sequences per job: chunks of max(1, batch_size // n) problems
    sampling: dict[str, Any]                   # SamplingParams' SAMPLING_FIELDS; temperature 0 = greedy
    template: str = "auto"
    interoception: bool = False                # tag each ε > 0 run's prompts with its rate
    reward: str | None = None                  # None: each problem's own verifier (its ``reward`` field)
    reward_kwargs: dict = field(default_factory=dict)
    ks: tuple[int, ...] = ()                   # pass@k reported beside k = 1, 2, 4, … ≤ n

    def config(self, method: str, eps: float) -> EvictionConfig | None:
        """The eviction config of a run (None for ``full``); ValueError names the field."""
        if method == "full":
            return None
        return EvictionConfig(**{**self.schedule.to_dict(), "eps": float(eps), "scorer": method,   # settings: its own scorer's only
                                 "scorer_args": self.schedule.scorer_args if method == self.schedule.scorer else {}})

    def sampling_params(self, chunk: int) -> SamplingParams:
        """The sampling of chunk ``chunk`` of every run (common random numbers across runs)."""
        return SamplingParams.from_fields(self.sampling, chunk_seed(self.seed, chunk), allow_greedy=True)

    def chunks(self, num_problems: int) -> list[list[int]]:
        per = max(1, self.batch_size // self.n)
        return [list(range(i, min(i + per, num_problems))) for i in range(0, num_problems, per)]


def chunk_seed(seed: int, chunk: int) -> int:
    return (int(seed) * 1_000_003 + chunk) % (2**63)


class Prompts:
    """Prompt texts and ids of every run, made once per eviction rate (untagged, or tagged with ε)."""

    def __init__(self, plan: EvalPlan, examples: list[dict], tokenizer):
        self.plan, self.examples, self.tokenizer = plan, examples, tokenizer
        self.by_rate: dict[float | None, tuple[list[str], list[list[int]]]] = {}

    def rate(self, eps: float) -> float | None:
        return eps if (self.plan.interoception and eps > 0) else None

    def get(self, eps: float) -> tuple[list[str], list[list[int]]]:
        from rlmem.evaluation.tasks import prompt_text

        rate = self.rate(eps)
        if rate not in self.by_rate:
            texts = [prompt_text(ex, self.tokenizer, self.plan.template, eviction_rate=rate) for ex in self.examples]
            ids = [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
            for i, p in enumerate(ids):
                if not p:
                    raise EvalError(f"problem {i} ({self.examples[i].get('id')}): empty prompt after tokenization")
            self.by_rate[rate] = texts, ids
        return self.by_rate[rate]


@dataclass
class Pending:
    """One job: a chunk's unfinished problems of one run, ``n`` samples each (problem-major)."""

    method: str
    eps: float
    problems: list[int]
    job: GenerationJob

    @property
    def run(self) -> str:
        return run_name(self.method, self.eps)


def pending_jobs(plan: EvalPlan, prompts: Prompts, store: CellStore) -> list[Pending]:
    """Every job still to run, in run order then chunk order (finished cells are skipped)."""
    out = []
    chunks = plan.chunks(len(prompts.examples))
    for method, eps in plan.runs:
        run, cfg = run_name(method, eps), plan.config(method, eps)
        _, ids = prompts.get(eps)
        for ci, chunk in enumerate(chunks):
            todo = [p for p in chunk if not store.done(run, p)]
            if todo:
                out.append(Pending(method, eps, todo, GenerationJob(
                    [ids[p] for p in todo for _ in range(plan.n)], cfg, plan.sampling_params(ci))))
    return out


def sample(plan: EvalPlan, examples: list[dict], tokenizer, executor: Executor, store: CellStore, *,
           on_commit: Callable[[Pending, list], None] | None = None) -> None:
    """Generate, grade and commit every unfinished cell of ``plan``.

    Jobs go to ``executor`` ``executor.parallel`` at a time; each finished job's cells are
    committed to ``store`` before the next ones start (``rlmem eval`` loses at most those on a
    crash). Every run's prompts are checked before anything is generated.
    """
    from rlmem.evaluation.tasks import completion_text, grade

    prompts = Prompts(plan, examples, tokenizer)
    for _, eps in plan.runs:
        prompts.get(eps)
    todo = pending_jobs(plan, prompts, store)
    width = max(1, int(getattr(executor, "parallel", 1)))
    for start in range(0, len(todo), width):
        wave = todo[start:start + width]
        try:
            outs = executor.generate([w.job for w in wave])
        except EvalError:
            raise
        except ValueError as e:   # e.g. prompt + max_new_tokens beyond the model's positions
            w = wave[0]
            raise EvalError(f"{w.run}, problems {w.problems[0]}-{wave[-1].problems[-1]}: {e}") from None
        for w, recs in zip(wave, outs):
            texts, _ = prompts.get(w.eps)
            jobs = [(p, j) for p in w.problems for j in range(plan.n)]
            comp = [completion_text(tokenizer, r.completion_ids) for r in recs]
            scores = grade([examples[p] for p, _ in jobs], comp, [texts[p] for p, _ in jobs],
                           reward=plan.reward, reward_kwargs=plan.reward_kwargs)
            store.commit(*make_cells(w.method, w.eps, jobs, recs, comp, scores, examples))
            if on_commit is not None:
                on_commit(w, recs)


def make_cells(method: str, eps: float, jobs: list[tuple[int, int]], recs: list, comp: list[str],
               scores: list[float], examples: list[dict]) -> tuple[list[Cell], dict[str, list[dict]]]:
    """The cells of one job and its records (reward = the verifier's score, problem/sample indices)."""
    from rlmem.eviction.record import peak_kv

    run = run_name(method, eps)
    by_problem: dict[int, list[int]] = {}
    for k, (p, _) in enumerate(jobs):
        by_problem.setdefault(p, []).append(k)
    cells, lines = [], []
    for p, ks in by_problem.items():
        cells.append(Cell(method=method, eps=eps, problem=p, prompt_len=len(recs[ks[0]].prompt_ids),
                          scores=[scores[k] for k in ks], completion_lens=[len(recs[k].completion_ids) for k in ks],
                          peaks=[peak_kv(recs[k]) for k in ks]))
        for k in ks:
            recs[k].reward = scores[k]
            recs[k].extra.update(method=method, eps=eps, problem_index=p, sample_index=jobs[k][1],
                                 problem_id=examples[p].get("id"), completion_text=comp[k])
            lines.append(recs[k].to_dict())
    return cells, {run: lines}


def result_rows(plan: EvalPlan, store: CellStore, runs: list[tuple[str, float]] | None = None) -> list[dict[str, Any]]:
    """One row per run with finished cells (``runs``, default the plan's): the rows of
    ``results.json`` and of ``eval.jsonl`` alike (:func:`rlmem.evaluation.results.summarize_run`)."""
    from rlmem.evaluation.results import summarize_run

    full = store.run_cells("full")
    return [summarize_run(m, e, store.run_cells(run_name(m, e)), full, ks=plan.ks)
            for m, e in (plan.runs if runs is None else runs) if store.run_cells(run_name(m, e))]


def evaluate(plan: EvalPlan, examples: list[dict], tokenizer, executor: Executor,
             store: CellStore | None = None) -> list[dict[str, Any]]:
    """Sample every cell of ``plan`` and return its rows (the in-training evaluation: cells in memory)."""
    store = CellStore() if store is None else store
    sample(plan, examples, tokenizer, executor, store)
    return result_rows(plan, store)
