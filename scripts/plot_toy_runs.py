"""Training curves of toy runs: ``python scripts/plot_toy_runs.py OUT.png LABEL=RUN_DIR ...``."""

import json
import sys
from pathlib import Path

from rlmem.plots import plot_training_curves

if __name__ == "__main__":
    out, *pairs = sys.argv[1:]
    runs = {}
    for pair in pairs:
        label, run_dir = pair.split("=", 1)
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        runs[label] = [row for row in map(json.loads, lines) if "reward/mean" in row]
    print(plot_training_curves(runs, out))
