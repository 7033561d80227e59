"""The ``rlmem`` command.

Each subcommand lives in its own module under ``rlmem/commands/`` with two functions:
``add_parser(subparsers)`` and ``run(args) -> int``. Heavy imports (torch, ray, deepspeed) happen
inside ``run`` so that ``rlmem --help`` and config errors stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order ``rlmem --help`` lists them.
COMMANDS = ["train", "config", "rollout", "replay_check", "eval", "bench", "model", "tiny_model", "inspect"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlmem", description="Neural Garbage Collection: RL that learns to evict KV cache")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"rlmem.commands.{name}")
        except ModuleNotFoundError as e:  # a command whose module is not written yet is simply absent
            if e.name == f"rlmem.commands.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
