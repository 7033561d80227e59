"""Figures of the toy reproduction (docs/toy-reproduction.md).

    python scripts/plot_toy.py curves OUT.png LABEL=RUN_DIR ...     reward, accuracy, ε, peak-KV per step
    python scripts/plot_toy.py accuracy OUT.png LABEL=EVAL_DIR ...  held-out pass@1 vs peak-KV reduction

``curves`` reads each run's metrics.jsonl; ``accuracy`` reads each ``rlmem eval`` directory's
results.json and draws every (model, method) as one series, labelled ``method (LABEL)``, so the
baselines on two base models and NGC after RL share one set of axes.
"""

import json
import sys
from pathlib import Path

from rlmem.evaluation.plots import plot_accuracy_vs_reduction
from rlmem.plots import plot_training_curves


def pairs(args: list[str]) -> list[tuple[str, Path]]:
    out = []
    for a in args:
        if "=" not in a:
            sys.exit(f"error: {a!r}: expected LABEL=DIRECTORY")
        label, d = a.split("=", 1)
        out.append((label, Path(d)))
    return out


def curves(out: str, args: list[str]) -> Path:
    runs = {}
    for label, d in pairs(args):
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        runs[label] = [r for r in rows if "reward/mean" in r]
    return plot_training_curves(runs, out)


def accuracy(out: str, args: list[str]) -> Path:
    merged = []
    for label, d in pairs(args):
        for r in json.loads((d / "results.json").read_text())["results"]:
            merged.append({**r, "method": f"{r['method']} ({label})"})
    return plot_accuracy_vs_reduction(merged, out, title="countdown-toy, held-out pass@1 (T = 1) vs peak-KV reduction")


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] not in ("curves", "accuracy"):
        sys.exit(__doc__)
    kind, out, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    print((curves if kind == "curves" else accuracy)(out, rest))
