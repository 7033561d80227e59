"""``rlmem train CONFIG.yaml [key=value ...]``: validate the config, then run the Ray driver.

The config, the environment (engine, model, datasets) and the run directory are all checked
before anything heavy (Ray, DeepSpeed, vLLM) starts: a typo costs a second, not a cluster start-up.
Exit codes: 0 done, 2 bad input (config, data, run directory, checkpoint), 1 the run failed (a
one-line reason, e.g. a worker died), 130 interrupted (Ctrl-C), 143 stopped (SIGTERM, ``ray job stop``).
"""

from __future__ import annotations

import argparse
import signal
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
    except KeyboardInterrupt as e:
        driver = sys.modules.get("rlmem.train.driver")
        signum = getattr(e, "signum", None) or getattr(driver, "stop_signal", lambda _: signal.SIGINT)(e)
        print(f"\nrlmem train: {'interrupted' if signum == signal.SIGINT else 'stopped by ' + signal.Signals(signum).name}",
              file=sys.stderr)
        return 128 + int(signum)


def _run(args: argparse.Namespace) -> int:
    from rlmem.run.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from rlmem.run.config.checks import config_notes

    for key, note in config_notes(cfg):
        print(f"[rlmem] note: {key}: {note}", flush=True)
    from rlmem.train.driver import TrainingError, run_training

    try:
        run_training(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        code = getattr(e, "exit_code", 1)   # 2: bad input (run directory, checkpoint), as every command's error line
        print(f"error: {e}" if code == 2 else f"rlmem train: {e}", file=sys.stderr)
        return code
    return 0
