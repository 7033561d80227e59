"""``rlmem config show CONFIG.yaml [key=value ...]``: the resolved config and its batch sizes.

It runs every check ``rlmem train`` runs before Ray starts (the config's own, the environment's:
engine, model, datasets, learner; and what the run directory allows) and exits 2 with the full
list of problems when any fails, so it doubles as a validator.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show or check a run config")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config (YAML) and the derived batch sizes")
    show.add_argument("config", help="run config YAML")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, values parsed as YAML")
    show.add_argument("--no-check-files", action="store_true",
                      help="skip the checks of this machine (paths, engine, model cache, datasets, run directory): "
                           "for validating a cluster config on a laptop")
    show.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rlmem.run.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides, check_files=not args.no_check_files)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = "not checked (--no-check-files)"
    if not args.no_check_files:
        from rlmem.run.errors import TrainingError
        from rlmem.run.preflight import preflight
        from rlmem.run.rundir import plan_start

        _, problems = preflight(cfg)
        try:
            start = plan_start(cfg).describe()
        except TrainingError as e:
            problems.append(("output_dir", str(e)))
        if problems:
            print(f"error: {ConfigError(problems, args.config)}", file=sys.stderr)
            return 2
    print(f"# resolved config: {args.config}" + (f" + {' '.join(args.overrides)}" if args.overrides else ""))
    print(cfg.to_yaml(), end="")
    print()
    print(batch_table(cfg))
    print(f"# run directory: {start}")
    from rlmem.run.config.checks import config_notes

    for key, note in config_notes(cfg):
        print(f"# note: {key}: {note}")
    return 0


def batch_table(cfg) -> str:
    """The derived batch sizes of one training step, in prompts and in samples, as comment lines."""
    b = cfg.batch_sizes()
    rows = [
        ("per step", f"{b.prompts_per_step} prompts", f"{b.samples_per_step} samples",
         f"{b.prompts_per_step} prompts x {b.rollouts_per_prompt} rollouts"),
        ("per rollout worker", f"{b.prompts_per_rollout_worker:g} prompts", f"{b.samples_per_rollout_worker} samples",
         f"{b.rollout_workers} rollout workers"),
        ("per optimizer step", f"{b.samples_per_optimizer_step // b.rollouts_per_prompt:g} prompts"
         if b.samples_per_optimizer_step % b.rollouts_per_prompt == 0
         else f"{b.samples_per_optimizer_step / b.rollouts_per_prompt:g} prompts",
         f"{b.samples_per_optimizer_step} samples",
         f"{b.mini_batches} mini-batches x {b.ppo_epochs} epochs = {b.optimizer_steps_per_step} optimizer steps per step"),
        ("per learner", "", f"{b.samples_per_learner} samples", f"{b.learner_workers} learner workers, per optimizer step"),
        ("micro-batch", "", f"{b.micro_batch_size} samples",
         f"{b.gradient_accumulation_steps} gradient accumulation steps; "
         f"{b.micro_batches_per_learner} micro-batches per learner per step"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    lines = ["# derived batch sizes (one training step)"]
    lines += [f"#   {a:<{w0}}  {p:>{w1}}  {s:>{w2}}   {note}" for a, p, s, note in rows]
    return "\n".join(lines)
