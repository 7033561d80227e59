"""Figures of an eval run: accuracy against compression per method, and pass@k curves.

The first answers the question NGC is about: at the same memory (peak-KV reduction), which
eviction rule keeps the most accuracy? One marker per method, one point per ε, error bars = the
standard error of pass@1; the ``full`` run sits at 1×.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rlmem.plots import pyplot, save_figure

MARKERS = "osD^v<>ph*XP"


def _save(fig, path: str | os.PathLike) -> Path:
    return save_figure(fig, path, dpi=110)


def _methods(results: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in results:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def plot_accuracy_vs_reduction(results: list[dict[str, Any]], path: str | os.PathLike, *, k: int = 1,
                               title: str = "accuracy vs peak-KV reduction") -> Path:
    """pass@k (± SE) against peak-KV reduction, one series per method (points joined in ε order)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    key = f"pass@{k}"
    top = 0.0
    for i, m in enumerate(_methods(results)):
        pts = sorted((r for r in results if r["method"] == m and r.get(key) is not None
                      and r.get("peak_kv_reduction") is not None), key=lambda r: r["eps"])
        if not pts:
            continue
        xs = [r["peak_kv_reduction"] for r in pts]
        ys = [r[key] for r in pts]
        es = [r.get(f"{key}_stderr", 0.0) for r in pts]
        top = max([top, *(y + e for y, e in zip(ys, es))])
        style = (dict(marker="*", markersize=11, **({"color": "black"} if m == "full" else {}))
                 if m.split(" (")[0] == "full" else dict(marker=MARKERS[i % len(MARKERS)]))
        ax.errorbar(xs, ys, yerr=es, capsize=3, lw=1, label=m, **style)
        for r, x, y in zip(pts, xs, ys):
            if m.split(" (")[0] != "full":
                ax.annotate(f"ε={r['eps']:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
    ax.set_xlabel("average peak-KV reduction (×, higher = less memory)")
    ax.set_ylabel(key)
    ax.set_ylim(-0.03 * max(top, 0.1), min(1.03, 1.15 * top + 0.02))   # low accuracies keep their spread
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_pass_at_k(results: list[dict[str, Any]], path: str | os.PathLike, title: str = "pass@k") -> Path:
    """pass@k against k (log2 axis) for every (method, ε), with error bars."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    top = 0.0
    for i, r in enumerate(results):
        ks = sorted(int(k[5:]) for k in r if k.startswith("pass@") and not k.endswith("_stderr"))
        if not ks:
            continue
        label = "full" if r["method"] == "full" else f"{r['method']} ε={r['eps']:g}"
        top = max([top, *(r[f"pass@{k}"] + r[f"pass@{k}_stderr"] for k in ks)])
        ax.errorbar(ks, [r[f"pass@{k}"] for k in ks], yerr=[r[f"pass@{k}_stderr"] for k in ks], capsize=2, lw=1,
                    marker=MARKERS[i % len(MARKERS)], label=label,
                    **({"color": "black"} if r["method"] == "full" else {}))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_ylim(-0.03 * max(top, 0.1), min(1.03, 1.15 * top + 0.02))   # low accuracies keep their spread
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)
