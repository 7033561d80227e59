"""Results of an eval run: pass@k with standard errors and peak-KV reduction per (method, ε).

Accuracy is ``pass@k`` (unbiased estimator, :func:`rlmem.metrics.pass_at_k_summary`) for
``k = 1, 2, 4, … ≤ N``; a sample is correct when its verifier score is ≥ 1.

Peak-KV reduction (docs/design.md, "Metric"; :func:`rlmem.metrics.peak_kv_reduction`): per
problem, the full-cache peak for the ``full`` run's completion length over the method's peak.
**Choice** with ``N`` samples: sample ``j`` of a method is paired with sample ``j`` of ``full`` on
the same problem (both drew their tokens from the same seed), and the ratio is averaged over all
pairs, so ``full``'s own reduction is exactly 1.0. Only problems finished by both runs count.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rlmem.evaluation.store import Cell
from rlmem.metrics import pass_at_k_summary, peak_kv_reduction


def pass_ks(n: int) -> list[int]:
    """1, 2, 4, … up to ``n``."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks


def summarize_run(method: str, eps: float, cells: list[Cell], full_cells: list[Cell], *,
                  ks: tuple[int, ...] | list[int] = ()) -> dict[str, Any]:
    """One result row (cells of one run, and of the ``full`` run as the reduction's baseline): the
    row of ``results.json`` and of a training run's ``eval.jsonl`` alike. pass@k for k = 1, 2, 4,
    … ≤ N and every other k of ``ks`` (≤ N)."""
    if not cells:
        raise ValueError(f"{method} eps={eps}: no finished problems")
    n = len(cells[0].scores)
    correct = [sum(s >= 1.0 for s in c.scores) for c in cells]
    res: dict[str, Any] = {"method": method, "eps": eps, "problems": len(cells), "samples_per_problem": n,
                           "accuracy": sum(correct) / (n * len(cells))}
    for k in sorted(set(pass_ks(n)) | {k for k in ks if 1 <= k <= n}):
        res[f"pass@{k}"], res[f"pass@{k}_stderr"] = pass_at_k_summary(correct, n, k)
    lens = [x for c in cells for x in c.completion_lens]
    peaks = [x for c in cells for x in c.peaks]
    res["completion_length_mean"] = sum(lens) / len(lens)
    res["peak_kv_mean"] = sum(peaks) / len(peaks)
    base = {c.problem: c for c in full_cells}
    paired = [c for c in cells if c.problem in base]
    if paired:
        p = [base[c.problem].prompt_len for c in paired for _ in c.peaks]
        cb = [x for c in paired for x in base[c.problem].completion_lens]
        mp = [max(1, x) for c in paired for x in c.peaks]
        res["peak_kv_reduction"] = peak_kv_reduction(p, cb, mp)
    else:
        res["peak_kv_reduction"] = None
    return res


def write_results(out_dir: str | os.PathLike, settings: dict[str, Any], results: list[dict[str, Any]]) -> Path:
    """``results.json`` (atomically replaced): the settings and one entry per (method, ε)."""
    path = Path(out_dir) / "results.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def results_markdown(results: list[dict[str, Any]], title: str = "") -> str:
    """A markdown table: method, ε, pass@k ± SE for every k, peak-KV reduction, lengths, problems."""
    ks = sorted({int(k[5:]) for r in results for k in r if k.startswith("pass@") and not k.endswith("_stderr")})
    head = ["method", "ε"] + [f"pass@{k}" for k in ks] + ["peak-KV reduction", "peak KV (mean)",
                                                          "completion length (mean)", "problems × samples"]
    lines = ([f"# {title}", ""] if title else []) + ["| " + " | ".join(head) + " |",
                                                      "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        row = [r["method"], f"{r['eps']:g}"]
        row += [f"{r[f'pass@{k}']:.3f} ± {r[f'pass@{k}_stderr']:.3f}" if f"pass@{k}" in r else "-" for k in ks]
        red = r.get("peak_kv_reduction")
        row += [f"{red:.2f}×" if red is not None else "-", f"{r['peak_kv_mean']:.1f}",
                f"{r['completion_length_mean']:.1f}", f"{r['problems']} × {r['samples_per_problem']}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(out_dir: str | os.PathLike, results: list[dict[str, Any]], title: str = "") -> Path:
    path = Path(out_dir) / "results.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(results_markdown(results, title))
    os.replace(tmp, path)
    return path
