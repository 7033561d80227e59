"""``rlmem eval``: pass@k and peak-KV reduction of full cache, NGC and the baselines on one task."""

from __future__ import annotations

import argparse


def _methods(text: str) -> list[str]:
    out = [m.strip() for m in text.split(",") if m.strip()]
    if not out:
        raise argparse.ArgumentTypeError("expected a comma-separated list of methods")
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    from rlmem.commands.common import DTYPE_CHOICES, add_backend_arg, add_eviction_args, add_sampling_args
    from rlmem.engine.sampling import SAMPLING_FIELDS
    from rlmem.evaluation.runner import EvalSettings

    d = EvalSettings(model="", task="", out="")
    p = sub.add_parser("eval", help="evaluate full cache, NGC and eviction baselines: accuracy vs peak-KV reduction")
    p.add_argument("--model", required=True, help="local HF model directory or a .gguf file")
    p.add_argument("--task", required=True,
                   help="countdown | passkey | passkey-write | amc23 | aime24 | aime25 | <dataset id> | jsonl:PATH")
    p.add_argument("--methods", type=_methods, default=d.methods,
                   help="comma-separated: full, ngc and baseline scorers (full is always run: the reduction's baseline)")
    p.add_argument("--eps", type=float, nargs="+", default=d.eps, help="eviction rates to evaluate")
    p.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
    # the schedule: EvictionConfig's flags (ε and the scorer are --eps and --methods)
    add_eviction_args(p, exclude=("eps", "scorer", "scorer_args"))   # scorer settings: one scorer's, not per method
    # SamplingParams' flags, with evaluation's defaults (rlmem.evaluation.pipeline.EVAL_SAMPLING_DEFAULTS)
    add_sampling_args(p, defaults={k: getattr(d, k) for k in SAMPLING_FIELDS}, greedy=True)
    g = p.add_argument_group("samples")
    g.add_argument("--n", type=int, default=d.n, help=f"samples per problem (default {d.n})")
    g.add_argument("--seed", type=int, default=d.seed, help="sampling seed: chunk c of every run samples with "
                                                            "(seed, c), common random numbers across runs")
    g = p.add_argument_group("problems")
    g.add_argument("--split", choices=["train", "test"], default=d.split)
    g.add_argument("--limit", type=int, default=None, help="number of problems (generated tasks: how many)")
    g.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option of a generated task, e.g. filler_repeats=6 or write_items=8 for passkey (repeatable)")
    g.add_argument("--template", choices=["auto", "chat", "plain"], default=d.template)
    g.add_argument("--interoception", action="store_true",
                   help="tag each eviction run's prompts with its rate, as training with "
                        "eviction.interoception does (the full run stays untagged)")
    g.add_argument("--reward", default=None, metavar="NAME",
                   help="grade every problem with this verifier (a registered name or module:function, as a "
                        "run's data.reward); default: each problem's own")
    g.add_argument("--reward-option", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument of --reward (as a run's data.reward_kwargs; repeatable)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences generated together")
    add_backend_arg(p)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=d.dtype)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, one per core). Set 1 beside another torch "
                        "process: two processes each using every core slow both many-fold")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rlmem.commands.common import CommandError, as_flags, eviction_from_args, sampling_from_args
    from rlmem.evaluation.runner import EvalError, EvalSettings, run_eval
    from rlmem.evaluation.store import StoreError
    from rlmem.evaluation.tasks import TaskError, parse_options

    try:
        options = parse_options(args.task_option)
        reward_kwargs = parse_options(args.reward_option, flag="--reward-option")
    except TaskError as e:
        raise CommandError(str(e)) from None
    if args.threads is not None:
        if args.threads < 1:
            raise CommandError(f"--threads: must be >= 1 (got {args.threads})")
        import torch

        torch.set_num_threads(args.threads)
    from rlmem.eviction.policy import EvictionConfig

    # the schedule's ε and scorer are placeholders: each run sets its own (--eps, --methods)
    schedule = eviction_from_args(args, eps=EvictionConfig.eps, scorer="ngc", scorer_args={})
    s = EvalSettings(model=args.model, task=args.task, out=args.out, methods=args.methods, eps=args.eps, n=args.n,
                     seed=args.seed, schedule=schedule, **sampling_from_args(args), split=args.split,
                     limit=args.limit, task_options=options, template=args.template,
                     interoception=args.interoception, reward=args.reward, reward_kwargs=reward_kwargs,
                     batch_size=args.batch_size, backend=args.backend, dtype=args.dtype)
    try:
        results = run_eval(s, progress=not args.no_progress)
    except (EvalError, StoreError, TaskError) as e:
        raise CommandError(as_flags(as_flags(str(e), "sampling"), "eviction")) from None
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished cells are saved in {args.out}; rerun the same command to resume")
        return 130
    from rlmem.evaluation.results import results_markdown

    print(results_markdown(results))
    print(f"wrote {args.out}/results.json, results.md, accuracy_vs_reduction.png, pass_at_k.png, records/")
    return 0
