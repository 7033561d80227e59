"""The ``rlmem`` command.

Each subcommand lives in its own module under ``rlmem/commands/`` with two functions:
``add_parser(subparsers)`` and ``run(args) -> int``. Heavy imports (torch, ray, deepspeed) happen
inside ``run`` so that ``rlmem --help`` and config errors stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Subcommand modules, in the order ``rlmem --help`` lists them.
COMMANDS = ["train", "config", "rollout", "replay_check", "eval", "serve", "bench", "model", "tiny_model", "inspect", "doctor"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlmem", description="Neural Garbage Collection: RL that learns to evict KV cache")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"rlmem.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a user error prints ``error: ...`` and returns 2 (as argparse does)."""
    from rlmem.commands.common import CommandError

    try:
        parser = build_parser()   # imports every command module: seconds on a loaded machine
    except KeyboardInterrupt:
        print("\nrlmem: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CommandError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`rlmem inspect ... | head`): stop quietly, as `cat` does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        # Ctrl-C anywhere (an import, a model load): one line and the shell's 128 + SIGINT, no
        # traceback. Commands with something to say (train: the last checkpoint; rollout: --out
        # not written) catch it themselves first.
        print(f"\nrlmem {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
