"""``rlmem eval``'s loop: every (method, ε, problem) cell sampled ``N`` times, graded, committed.

Runs are ``full`` (always run first: it is the baseline of the peak-KV reduction) then every
``method × ε``. NGC and every baseline scorer run behind the same schedule (δ, ε, block size,
window, protect_recent) with deterministic top-k evictions (``greedy_evictions=True``, evaluation
mode in docs/design.md section 1).

Problems are processed in fixed chunks of ``max(1, batch_size // N)`` problems (``N`` samples
each, generated together). A chunk's sampling seed depends only on ``(seed, chunk index)``, the
same for every method, so:

* a resumed run regenerates exactly the cells an uninterrupted one would have produced;
* sample ``j`` of a method and sample ``j`` of ``full`` share their random numbers (common random
  numbers make the per-sample peak-KV pairing and the method comparison less noisy).

Each finished chunk is committed to :class:`rlmem.evaluation.store.EvalStore` before the next one
starts; finished cells are skipped on resume.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlmem.evaluation.plots import plot_accuracy_vs_reduction, plot_pass_at_k
from rlmem.evaluation.results import summarize_run, write_markdown, write_results
from rlmem.evaluation.store import Cell, EvalStore, run_name
from rlmem.evaluation.tasks import completion_text, grade, load_task, prompt_text
from rlmem.eviction.policy import EvictionConfig


class EvalError(ValueError):
    """Settings that cannot run (the message names the option)."""


@dataclass
class EvalSettings:
    model: str
    task: str
    out: str
    methods: list[str] = field(default_factory=lambda: ["full", "ngc"])
    eps: list[float] = field(default_factory=lambda: [0.5])
    n: int = 4                       # samples per problem
    max_new_tokens: int = 256
    seed: int = 0
    delta: int = EvictionConfig.delta             # the schedule's defaults are EvictionConfig's (the paper's)
    block_size: int = EvictionConfig.block_size
    window: int = EvictionConfig.window
    protect_recent: int = EvictionConfig.protect_recent
    split: str = "test"
    limit: int | None = None         # number of problems (generated tasks: how many to generate)
    task_options: dict = field(default_factory=dict)   # data-source options (passkey: filler_repeats, ...)
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    template: str = "auto"
    interoception: bool = False      # tag each ε > 0 prompt with its rate, as training with interoception does
    batch_size: int = 16
    backend: str = "torch"
    dtype: str = "float32"

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resume must share (methods and ε may be added to a run directory)."""
        d = dataclasses.asdict(self)
        for k in ("methods", "eps", "out"):
            d.pop(k)
        return d

    def runs(self) -> list[tuple[str, float]]:
        """``(method, ε)`` pairs in run order: ``full`` first, then each method at each ε."""
        return [("full", 0.0)] + [(m, float(e)) for m in self.methods if m != "full" for e in self.eps]


def known_methods() -> list[str]:
    """``full`` and every registered eviction scorer (``ngc`` and the heuristic baselines)."""
    from rlmem.eviction.scorers import scorer_names

    return ["full", *[n for n in scorer_names() if n != "full"]]


def validate(s: EvalSettings) -> None:
    known = known_methods()
    bad = [m for m in s.methods if m not in known]
    if bad:
        raise EvalError(f"--methods: unknown method {bad[0]!r}; known: {', '.join(known)}")
    if not s.methods:
        raise EvalError("--methods: at least one method is needed")
    if any(m != "full" for m in s.methods):
        if not s.eps:
            raise EvalError("--eps: at least one eviction rate is needed for methods other than full")
        for e in s.eps:
            if not 0 < e <= 1:
                raise EvalError(f"--eps: every value must be in (0, 1] (got {e})")
    for name in ("n", "max_new_tokens", "batch_size"):
        if getattr(s, name) < 1:
            raise EvalError(f"--{name.replace('_', '-')}: must be >= 1 (got {getattr(s, name)})")
    if not s.temperature >= 0:
        raise EvalError(f"--temperature: must be >= 0, 0 for greedy decoding (got {s.temperature})")
    if s.limit is not None and s.limit < 1:
        raise EvalError(f"--limit: must be >= 1 (got {s.limit})")
    from rlmem.engine.registry import engine_unavailable_reason

    why = engine_unavailable_reason(s.backend)
    if why is not None:
        raise EvalError(f"--backend {s.backend}: {why}")
    for m, e in s.runs():
        try:
            method_config(m, e, s)
        except ValueError as err:
            raise EvalError(f"{m} at eps={e}: {err}") from None


def method_config(method: str, eps: float, s: EvalSettings) -> EvictionConfig | None:
    """The eviction config of a run (None for ``full``)."""
    if method == "full":
        return None
    return EvictionConfig(delta=s.delta, eps=eps, block_size=s.block_size, window=s.window,
                          protect_recent=s.protect_recent, scorer=method)


def chunk_seed(seed: int, chunk: int) -> int:
    return (int(seed) * 1_000_003 + chunk) % (2**63)


def make_tokenizer(s: EvalSettings):
    """The tokenizer of ``--model`` (a directory or a ``.gguf`` file)."""
    from rlmem.models.loading import ModelLoadError, load_tokenizer

    try:
        return load_tokenizer(s.model)
    except ModelLoadError as e:
        raise EvalError(f"--model {e}") from None


def make_engine(s: EvalSettings):
    """The rollout engine (``--backend``) for ``--model``; built only when a cell is left to sample."""
    from rlmem.engine.registry import create_engine
    from rlmem.models.loading import ModelLoadError

    try:
        return create_engine(s.backend, s.model, dtype=s.dtype, seed=s.seed)
    except ModelLoadError as e:
        raise EvalError(f"--model {e}") from None


def run_eval(s: EvalSettings, *, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) the eval; write results.json, results.md and the plots; return the results."""
    from tqdm import tqdm

    from rlmem.engine.sampling import SamplingParams

    validate(s)
    task = load_task(s.task, split=s.split, limit=s.limit, seed=s.seed, options=s.task_options)
    store = EvalStore(s.out)
    store.open(s.fingerprint())
    tokenizer = make_tokenizer(s)
    engine = None
    examples = task.examples
    prompts: dict[float | None, tuple[list[str], list[list[int]]]] = {}

    def prompts_for(eps: float) -> tuple[list[str], list[list[int]]]:
        """Prompt texts and ids of a run: untagged, or tagged with ε (``--interoception``)."""
        rate = eps if (s.interoception and eps > 0) else None
        if rate not in prompts:
            texts = [prompt_text(ex, tokenizer, s.template, eviction_rate=rate) for ex in examples]
            ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
            for i, p in enumerate(ids):
                if not p:
                    raise EvalError(f"problem {i} ({examples[i].get('id')}): empty prompt after tokenization")
            prompts[rate] = texts, ids
        return prompts[rate]

    runs = s.runs()
    for _, eps in runs:   # every run's prompts are checked before anything is generated
        prompts_for(eps)
    per = max(1, s.batch_size // s.n)
    chunks = [list(range(i, min(i + per, len(examples)))) for i in range(0, len(examples), per)]
    done = sum(store.done(run_name(m, e), p) for m, e in runs for p in range(len(examples)))
    bar = tqdm(total=len(runs) * len(examples) * s.n, initial=done * s.n, desc="eval", unit="seq",
               disable=not progress, dynamic_ncols=True)
    tokens, seconds = 0, 0.0
    greedy = s.temperature == 0   # T = 0 means greedy decoding (top-1), as in vLLM
    for method, eps in runs:
        run = run_name(method, eps)
        cfg = method_config(method, eps, s)
        texts, ids = prompts_for(eps)
        for ci, chunk in enumerate(chunks):
            todo = [p for p in chunk if not store.done(run, p)]
            if not todo:
                continue
            bar.set_postfix_str(f"{run}, problems {todo[0]}-{todo[-1]}", refresh=False)
            jobs = [(p, j) for p in todo for j in range(s.n)]
            sampling = SamplingParams(temperature=1.0 if greedy else s.temperature, top_k=1 if greedy else s.top_k,
                                      top_p=1.0 if greedy else s.top_p,
                                      max_new_tokens=s.max_new_tokens, seed=chunk_seed(s.seed, ci))
            t0 = time.perf_counter()
            if engine is None:
                engine = make_engine(s)
            try:
                recs = engine.generate([ids[p] for p, _ in jobs], sampling, cfg, greedy_evictions=True)
            except ValueError as e:   # e.g. prompt + max_new_tokens beyond the model's positions
                raise EvalError(f"{run}, problems {todo[0]}-{todo[-1]}: {e}") from None
            seconds += time.perf_counter() - t0
            comp = [completion_text(tokenizer, r.completion_ids) for r in recs]
            scores = grade([examples[p] for p, _ in jobs], comp, [texts[p] for p, _ in jobs])
            store.commit(*_cells(method, eps, jobs, recs, comp, scores, examples))
            tokens += sum(len(r.completion_ids) for r in recs)
            bar.update(len(jobs))
            bar.set_postfix_str(f"{run}, {tokens / max(seconds, 1e-9):.0f} tok/s")
    bar.close()
    return finish(s, store)


def _cells(method, eps, jobs, recs, comp, scores, examples) -> tuple[list[Cell], dict[str, list[dict]]]:
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


def stored_runs(s: EvalSettings, store: EvalStore) -> list[tuple[str, float]]:
    """The runs to report: this invocation's, then any other the directory holds (same settings).

    An eval directory grows by invocations (``--methods h2o`` added to an earlier ``full,ngc``);
    the results files describe all of its finished cells, not only the last command's.
    """
    runs = s.runs()
    seen = {run_name(m, e) for m, e in runs}
    others = sorted({(c.method, float(c.eps)) for c in store.cells.values() if c.run not in seen})
    return runs + others


def finish(s: EvalSettings, store: EvalStore) -> list[dict[str, Any]]:
    """Summaries of every run in the finished-cell index; results files and plots."""
    full = store.run_cells("full")
    runs = stored_runs(s, store)
    results = [summarize_run(m, e, store.run_cells(run_name(m, e)), full) for m, e in runs
               if store.run_cells(run_name(m, e))]
    methods = list(dict.fromkeys(m for m, _ in runs))
    eps = sorted({e for m, e in runs if m != "full"} | {float(e) for e in s.eps})
    settings = {**s.fingerprint(), "methods": methods, "eps": eps}
    write_results(s.out, settings, results)
    title = f"{Path(s.model).name} on {s.task}: N={s.n}, δ={s.delta}, b={s.block_size}, w={s.window}"
    write_markdown(s.out, results, title)
    plot_accuracy_vs_reduction(results, Path(s.out) / "accuracy_vs_reduction.png", title=title)
    plot_pass_at_k(results, Path(s.out) / "pass_at_k.png", title=title)
    return results
