"""``rlmem train CONFIG.yaml [key=value ...]``: validate the config, then run the Ray driver.

The config is loaded and checked completely before anything heavy (Ray, DeepSpeed, vLLM) is
imported: a typo costs a second, not a cluster start-up. Exit codes: 0 done, 2 bad config,
1 the run failed (a one-line reason, e.g. a worker died), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model with NGC (Dr. GRPO) from a run config")
    p.add_argument("config", help="run config YAML (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, values parsed as YAML, e.g. trainer.total_steps=2 eviction.eps=0.75")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("\nrlmem train: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from rlmem.train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    from rlmem.train.driver import TrainingError, run_training

    try:
        run_training(cfg)
    except TrainingError as e:
        print(f"rlmem train: {e}", file=sys.stderr)
        return 1
    return 0
