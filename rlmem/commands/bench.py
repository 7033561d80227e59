"""``rlmem bench {rollout,learner,rewards,serve}``: benchmarks that print ratios against a baseline measured in the same run."""

from __future__ import annotations

import argparse
import importlib

# benchmark name -> module under rlmem/bench/ exposing add_arguments(parser) and run(args) -> int
BENCHMARKS = {"rollout": "rlmem.bench.rollout", "learner": "rlmem.bench.learner", "rewards": "rlmem.bench.rewards",
              "serve": "rlmem.bench.serve"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (ratios against an in-run baseline)")
    bsub = p.add_subparsers(dest="benchmark", required=True)
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        bp = bsub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(bp)
        bp.set_defaults(func=module.run)
