"""Figures of the toy reproduction (docs/toy-reproduction.md).

    python scripts/plot_toy.py curves OUT.png LABEL=RUN_DIR[,BRANCH_DIR...] ...
                                                       reward, accuracy, ε, peak-KV per step
    python scripts/plot_toy.py accuracy OUT.png LABEL=EVAL_DIR ...  held-out pass@1 vs peak-KV reduction
    python scripts/plot_toy.py stages OUT.png EPS STEP=EVAL_DIR ... bar=EVAL_DIR ... [mark=STEP:TEXT ...]
                                                       NGC's pass@1 at EPS over RL steps, one line per eval
                                                       seed, against the best rule of each bar=DIR

``curves`` reads each run's metrics.jsonl; ``accuracy`` reads each ``rlmem eval`` directory's
results.json and draws every (model, method) as one series, labelled ``method (LABEL)``, so the
baselines on two base models and NGC after RL share one set of axes.
"""

import json
import sys
from pathlib import Path

from rlmem.figures import plot_accuracy_vs_reduction, plot_training_curves
from rlmem.run.logger import read_metrics


def pairs(args: list[str]) -> list[tuple[str, Path]]:
    out = []
    for a in args:
        if "=" not in a:
            sys.exit(f"error: {a!r}: expected LABEL=DIRECTORY")
        label, d = a.split("=", 1)
        out.append((label, Path(d)))
    return out


def curves(out: str, args: list[str]) -> Path:
    """``LABEL=DIR[,DIR...]``: a run and the runs branched from it, joined by step (a later directory's
    row wins), so a recipe trained as a chain of resumes is drawn as one curve."""
    runs = {}
    for label, dirs in pairs(args):
        by_step = {}
        for d in str(dirs).split(","):
            if not (Path(d) / "metrics.jsonl").is_file():
                sys.exit(f"error: {d}: no metrics.jsonl (not a training run directory)")
            by_step.update({r["step"]: r for r in read_metrics(d) if "reward/mean" in r})
        runs[label] = [by_step[k] for k in sorted(by_step)]
    return plot_training_curves(runs, out)


def accuracy(out: str, args: list[str]) -> Path:
    merged = []
    for label, d in pairs(args):
        for r in json.loads((d / "results.json").read_text())["results"]:
            merged.append({**r, "method": f"{r['method']} ({label})"})
    return plot_accuracy_vs_reduction(merged, out, title="countdown-toy, held-out pass@1 (T = 1) vs peak-KV reduction")


def _cell(results: list[dict], method: str, eps: float) -> dict | None:
    return next((r for r in results if r["method"] == method and abs(r["eps"] - eps) < 1e-9), None)


def stages(out: str, args: list[str]) -> Path:
    """How NGC at one ε moved over the recipe's RL steps (docs/toy-reproduction.md, sessions 5-7).

    Each STEP=DIR is an ``rlmem eval`` of the checkpoint of that step; points are grouped by the
    eval's seed (``settings.seed``: different seeds are fresh problems). Each bar=DIR draws, for its
    seed, the best rule at EPS (any method but full and ngc) as a dashed line with its ± SE band.
    Each mark=STEP:TEXT draws a vertical line where a stage of the recipe starts, labelled TEXT."""
    from rlmem.figures import pyplot, save_figure

    eps, entries = float(args[0]), pairs(args[1:])
    ngc: dict[int, list] = {}
    bars: dict[int, dict] = {}
    marks = [(int(str(d).split(":", 1)[0]), str(d).split(":", 1)[1]) for label, d in entries if label == "mark"]
    for label, d in (e for e in entries if e[0] != "mark"):
        data = json.loads((d / "results.json").read_text())
        seed, results = data["settings"]["seed"], data["results"]
        if label == "bar":
            rules = [r for r in results if r["method"] not in ("full", "ngc") and abs(r["eps"] - eps) < 1e-9]
            if not rules:
                sys.exit(f"error: {d}: no rule evaluated at ε = {eps:g}")
            bars[seed] = max(rules, key=lambda r: r["pass@1"])
        else:
            cell, full = _cell(results, "ngc", eps), _cell(results, "full", 0.0)
            if cell is None or full is None:
                sys.exit(f"error: {d}: needs the full and ngc (ε = {eps:g}) runs")
            ngc.setdefault(seed, []).append((int(label), cell, full))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.6, 4.2))
    for i, seed in enumerate(sorted(ngc)):
        pts = sorted(ngc[seed], key=lambda t: t[0])
        xs = [x + 1.2 * i for x, _, _ in pts]          # seeds side by side, not on top of each other
        ax.errorbar(xs, [c["pass@1"] for _, c, _ in pts], yerr=[c["pass@1_stderr"] for _, c, _ in pts],
                    color=f"C{i}", marker="o", capsize=3, lw=1.2, label=f"NGC at ε = {eps:g} (seed {seed})")
        ax.plot(xs, [f["pass@1"] for _, _, f in pts], color=f"C{i}", ls=":", marker=".", lw=1,
                label=f"its full cache (seed {seed})")
        if seed in bars:
            b = bars[seed]
            ax.axhline(b["pass@1"], color=f"C{i}", ls="--", lw=1,
                       label=f"best rule, {b['method']} (seed {seed})")
            ax.axhspan(b["pass@1"] - b["pass@1_stderr"], b["pass@1"] + b["pass@1_stderr"], color=f"C{i}", alpha=0.08)
    for x, text in marks:
        ax.axvline(x, color="grey", lw=0.8, ls="-.")
        ax.text(x + 2, 0.77, text, fontsize=7, color="dimgrey", va="top")
    ax.set_xlabel("RL step (the checkpoint evaluated)")
    ax.set_ylabel("held-out pass@1 (± SE)")
    ax.set_ylim(0, 0.8)
    ax.set_title(f"countdown-toy: NGC at ε = {eps:g} over the recipe, against the best rule", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # outside: the points stay visible
    return save_figure(fig, out, dpi=110)


if __name__ == "__main__":
    commands = {"curves": curves, "accuracy": accuracy, "stages": stages}
    if len(sys.argv) < 4 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    print(commands[sys.argv[1]](sys.argv[2], sys.argv[3:]))
