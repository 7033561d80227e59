"""``rlmem eval``: the evaluation pipeline (:mod:`rlmem.evaluation.pipeline`) on a local engine,
resumable in a run directory (:class:`rlmem.evaluation.store.EvalStore`).

:class:`EvalSettings` are the command's options; :meth:`EvalSettings.plan` turns them into the
pipeline's :class:`~rlmem.evaluation.pipeline.EvalPlan`, the same object a training run's
evaluation builds from its ``eval`` section. Each finished chunk is committed to the store before
the next one starts; finished cells are skipped on resume.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlmem.evaluation.executor import EngineExecutor
from rlmem.evaluation.fingerprint import model_fingerprint, resolve_model
from rlmem.models.hf_config import max_positions
from rlmem.evaluation.pipeline import EvalError, EvalPlan, eval_sampling_default, result_rows, sample
from rlmem.evaluation.results import write_markdown, write_results
from rlmem.evaluation.store import EvalStore, StoreError, check_out_dir, run_name
from rlmem.evaluation.tasks import load_task
from rlmem.eviction.policy import EVICTION_FIELDS, EvictionConfig
from rlmem.figures import plot_accuracy_vs_reduction, plot_pass_at_k

__all__ = ["EvalError", "EvalSettings", "run_eval"]

# The schedule fields of a run directory's settings (ε and the scorer are set per run).
SCHEDULE_FIELDS = tuple(f for f in EVICTION_FIELDS if f not in ("eps", "scorer", "scorer_args"))


@dataclass
class EvalSettings:
    model: str
    task: str
    out: str
    methods: list[str] = field(default_factory=lambda: ["full", "ngc"])
    eps: list[float] = field(default_factory=lambda: [0.5])
    n: int = 4                       # samples per problem
    seed: int = 0
    schedule: EvictionConfig = field(default_factory=EvictionConfig)   # EvictionConfig's fields and defaults
    # sampling: SamplingParams' fields, with evaluation's defaults (rlmem.evaluation.pipeline)
    temperature: float = eval_sampling_default("temperature")          # 0: greedy decoding
    top_k: int = eval_sampling_default("top_k")
    top_p: float = eval_sampling_default("top_p")
    max_new_tokens: int = eval_sampling_default("max_new_tokens")
    stop: list[str] = field(default_factory=lambda: list(eval_sampling_default("stop")))
    split: str = "test"
    limit: int | None = None         # number of problems (generated tasks: how many to generate)
    task_options: dict = field(default_factory=dict)   # data-source options (passkey: filler_repeats, ...)
    template: str = "auto"
    interoception: bool = False      # tag each ε > 0 prompt with its rate, as training with interoception does
    reward: str | None = None        # one verifier for every problem (None: each problem's own)
    reward_kwargs: dict = field(default_factory=dict)
    batch_size: int = 16
    backend: str = "torch"
    dtype: str = "float32"

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resume must share (methods and ε may be added to a run directory); the
        schedule is flattened to its fields (``delta``, ``block_size``, …)."""
        d = dataclasses.asdict(self)
        for k in ("methods", "eps", "out", "schedule"):
            d.pop(k)
        d.update({k: getattr(self.schedule, k) for k in SCHEDULE_FIELDS})
        d["model"] = resolve_model(self.model)   # `tiny` and /abs/path/tiny: one setting
        return d

    def runs(self) -> list[tuple[str, float]]:
        """``(method, ε)`` pairs in run order: ``full`` first, then each method at each ε."""
        return [("full", 0.0)] + [(m, float(e)) for m in self.methods if m != "full" for e in self.eps]

    def plan(self, runs: list[tuple[str, float]] | None = None) -> EvalPlan:
        from rlmem.engine.sampling import SAMPLING_FIELDS

        return EvalPlan(runs=tuple(self.runs() if runs is None else runs), schedule=self.schedule, n=self.n,
                        seed=self.seed, batch_size=self.batch_size,
                        sampling={k: getattr(self, k) for k in SAMPLING_FIELDS}, template=self.template,
                        interoception=self.interoception, reward=self.reward, reward_kwargs=dict(self.reward_kwargs))


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
    # duplicates are refused, not merged: `ngc,ngc` is more likely a typo for another method than
    # a wish to run ngc twice, and merging would quietly run less than the command says
    dup = next((m for i, m in enumerate(s.methods) if m in s.methods[:i]), None)
    if dup is not None:
        raise EvalError(f"--methods: {dup!r} is given twice")
    if any(m != "full" for m in s.methods):
        if not s.eps:
            raise EvalError("--eps: at least one eviction rate is needed for methods other than full")
        for e in s.eps:
            if not 0 < e <= 1:
                raise EvalError(f"--eps: every value must be in (0, 1] (got {e})")
        seen: dict[str, float] = {}
        for e in s.eps:   # runs are named by ε's %g: 0.5 and 0.5000001 would share one records file
            name = run_name("ngc", e).removeprefix("ngc_")
            if name in seen:
                same = "is given twice" if seen[name] == e else f"and {seen[name]} name the same run ({name})"
                raise EvalError(f"--eps: {e} {same}")
            seen[name] = e
    for name in ("n", "batch_size"):
        if getattr(s, name) < 1:
            raise EvalError(f"--{name.replace('_', '-')}: must be >= 1 (got {getattr(s, name)})")
    plan = s.plan()
    try:
        plan.sampling_params(0)
    except ValueError as e:
        raise EvalError(str(e)) from None
    if s.reward is not None:
        from rewards import get_reward

        try:
            get_reward(s.reward)
        except KeyError as e:
            raise EvalError(f"--reward: {str(e).strip(chr(34))}") from None
    if s.limit is not None and s.limit < 1:
        raise EvalError(f"--limit: must be >= 1 (got {s.limit})")
    from rlmem.engine.registry import engine_unavailable_reason

    why = engine_unavailable_reason(s.backend)
    if why is not None:
        raise EvalError(f"--backend {s.backend}: {why}")
    for m, e in s.runs():
        try:
            cfg = plan.config(m, e)
            if cfg is not None and s.backend == "vllm":
                check_vllm(cfg)
        except ValueError as err:   # eval names the scorer by --methods, not eviction.scorer
            raise EvalError(f"{m} at eps={e}: {str(err).replace('eviction.scorer=', 'method ')}") from None
    try:
        check_out_dir(s.out)
    except StoreError as e:
        raise EvalError(str(e)) from None


def check_out_outside_model(s: EvalSettings) -> None:
    """``--out`` must not lie in the model folder: its files are the model's fingerprint."""
    model, out = Path(resolve_model(s.model)), Path(s.out).expanduser().resolve()
    if model.is_dir() and (out == model or model in out.parents):
        raise EvalError(f"--out {s.out}: inside the --model folder {model} (its files are the model's "
                        f"fingerprint); choose a folder outside it")


def check_vllm(cfg: EvictionConfig) -> None:
    """The vLLM engine's own refusals (block size, step-observing scorers, protect_recent), the
    checks ``rollout`` and ``replay-check`` meet before vLLM starts; here they come before the
    model loads and before the full-cache pass, which needs no eviction config and would
    otherwise start vLLM and run to the end first."""
    from rlmem.engine.vllm.engine import check_block_size, check_eviction, cuda_present

    check_block_size(cfg.block_size, cuda=cuda_present())
    check_eviction(cfg, None)


def check_prompts(s: EvalSettings, examples: list[dict], tokenizer) -> None:
    """Every run's prompts tokenize, and prompt + ``max_new_tokens`` fits the model's positions
    (``max_position_embeddings`` of its config.json, read without loading the weights)."""
    from rlmem.evaluation.pipeline import Prompts

    plan = s.plan()
    prompts = Prompts(plan, examples, tokenizer)
    limit = max_positions(s.model)
    for _, e in plan.runs:
        _, ids = prompts.get(e)
        if limit is None:
            continue
        for i, p in enumerate(ids):
            if len(p) + s.max_new_tokens > limit:
                raise EvalError(f"--task {s.task}: problem {i} ({examples[i].get('id')}): prompt of {len(p)} "
                                f"tokens + --max-new-tokens {s.max_new_tokens} exceeds the model's "
                                f"max_position_embeddings ({limit})")


def make_tokenizer(s: EvalSettings):
    """The tokenizer of ``--model`` (a directory or a ``.gguf`` file)."""
    from rlmem.models.loading import ModelLoadError, load_tokenizer

    try:
        return load_tokenizer(s.model)
    except ModelLoadError as e:
        raise EvalError(f"--model {str(e).removeprefix('model ')}") from None


def make_engine(s: EvalSettings):
    """The rollout engine (``--backend``) for ``--model``; built only when a cell is left to sample."""
    from rlmem.engine.registry import create_engine
    from rlmem.models.loading import ModelLoadError

    try:
        return create_engine(s.backend, s.model, dtype=s.dtype, seed=s.seed)
    except ModelLoadError as e:
        raise EvalError(f"--model {str(e).removeprefix('model ')}") from None


def run_eval(s: EvalSettings, *, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) the eval; write results.json, results.md and the plots; return the results."""
    # every check before anything is created in --out or the model loads (docs/evaluation.md): a
    # refused command leaves no eval_config.json behind to refuse the corrected one
    validate(s)
    task = load_task(s.task, split=s.split, limit=s.limit, seed=s.seed, options=s.task_options)
    tokenizer = make_tokenizer(s)
    check_prompts(s, task.examples, tokenizer)
    check_out_outside_model(s)
    settings = {**s.fingerprint(), "model_files": model_fingerprint(s.model)}
    # a directory from before the fingerprint resumes unchecked (it has no fingerprint to compare)
    defaults = {**EvalSettings(model=s.model, task=s.task, out=s.out).fingerprint(),
                "model_files": settings["model_files"]}
    store = EvalStore(s.out)
    store.open(settings, defaults=defaults, normalize={"model": resolve_model})
    try:
        return _sample_and_finish(s, store, task, tokenizer, progress)
    finally:
        store.close()


def _sample_and_finish(s: EvalSettings, store: EvalStore, task, tokenizer, progress: bool) -> list[dict[str, Any]]:
    from tqdm import tqdm

    for note in store.notes:
        print(f"note: {note}", flush=True)
    plan, examples = s.plan(), task.examples
    done = sum(store.done(run_name(m, e), p) for m, e in plan.runs for p in range(len(examples)))
    bar = tqdm(total=len(plan.runs) * len(examples) * s.n, initial=done * s.n, desc="eval", unit="seq",
               disable=not progress, dynamic_ncols=True)
    clock = {"tokens": 0, "t": time.perf_counter(), "seconds": 0.0}

    def committed(job, recs) -> None:
        now = time.perf_counter()
        clock["seconds"] += now - clock["t"]
        clock["t"] = now
        clock["tokens"] += sum(len(r.completion_ids) for r in recs)
        bar.update(len(recs))
        bar.set_postfix_str(f"{job.run}, {clock['tokens'] / max(clock['seconds'], 1e-9):.0f} tok/s")

    sample(plan, examples, tokenizer, EngineExecutor(lambda: make_engine(s)), store, on_commit=committed)
    bar.close()
    return finish(s, store)


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
    runs = stored_runs(s, store)
    results = result_rows(s.plan(), store, runs)
    methods = list(dict.fromkeys(m for m, _ in runs))
    eps = sorted({e for m, e in runs if m != "full"} | {float(e) for e in s.eps})
    settings = {**s.fingerprint(), "methods": methods, "eps": eps}
    write_results(s.out, settings, results)
    sc = s.schedule
    title = f"{Path(s.model).name} on {s.task}: N={s.n}, δ={sc.delta}, b={sc.block_size}, w={sc.window}"
    write_markdown(s.out, results, title)
    plot_accuracy_vs_reduction(results, Path(s.out) / "accuracy_vs_reduction.png", title=title)
    plot_pass_at_k(results, Path(s.out) / "pass_at_k.png", title=title)
    return results
