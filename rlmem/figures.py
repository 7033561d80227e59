"""Every figure rlmem draws: pictures people would rather look at than read.

What a rollout evicted (:func:`plot_eviction_strip`, :func:`plot_replay_mask`: ``rlmem inspect``,
the training logger), accuracy against memory (:func:`plot_accuracy_vs_reduction`,
:func:`plot_pass_at_k`: ``rlmem eval`` and the in-training evaluation, from the same result rows),
training curves (:func:`plot_training_curves`: the toy report's scripts), and where a run's time went
(:func:`plot_timeline`: the training logger, from ``timeline.jsonl``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from rlmem.eviction.record import NEVER, RolloutRecord, evicted_at


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (runs, CI and eval have no display)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Lay out, write ``path`` (creating its directory) and close ``fig``; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_eviction_strip(record: RolloutRecord, num_layers: int, path: str | os.PathLike, title: str = "") -> Path:
    """Layers (y) × key positions (x), coloured by the round that evicted each key (grey: kept).

    The end of the prompt is marked; round times are ticked on top. Reading across a row shows
    which stretches of the reasoning a layer dropped and when.
    """
    plt = pyplot()
    import numpy as np

    ea = evicted_at(record, num_layers)
    n = ea.shape[1]
    times = [r.t for r in record.eviction.rounds] if record.eviction else []
    codes = torch.full(ea.shape, -1.0)
    for i, t in enumerate(times):
        codes[ea == t] = float(i)
    data = np.ma.masked_less(codes.numpy(), 0)
    fig, ax = plt.subplots(figsize=(min(16, max(7, 3 + n / 40)), 1.4 + 0.35 * num_layers))
    ax.set_facecolor("#d9d9d9")
    cmap = plt.get_cmap("viridis", max(len(times), 1))
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5,
                   vmax=max(len(times), 1) - 0.5, extent=(-0.5, n - 0.5, num_layers - 0.5, -0.5))
    ax.axvline(len(record.prompt_ids) - 0.5, color="red", lw=1, ls="--")
    for t in times:
        ax.axvline(t - 0.5, color="white", lw=0.4, alpha=0.6)
    ax.set_xlabel("key position (red dashed: end of prompt; white: round times)")
    ax.set_ylabel("layer")
    if times:
        cb = fig.colorbar(im, ax=ax, pad=0.01)
        cb.set_label("evicted at round")
    kept = int((ea == NEVER).sum())
    ax.set_title(title or f"what the model evicted: {len(times)} rounds, {kept}/{ea.numel()} (layer, key) "
                          f"entries kept to the end (grey)", fontsize=9)
    return save_figure(fig, path)


def replay_mask_codes(evicted_at, max_side: int = 512):
    """``[L, q, k]`` uint8 picture codes: 0 = future (k > q), 1 = evicted, 2 = visible.

    Visible iff ``k <= q < evicted_at[k]`` (docs/design.md section 1). Long sequences are subsampled
    evenly to at most ``max_side`` queries and keys so that 28 layers × 1.3k tokens stay cheap.
    """
    import numpy as np

    ev = np.asarray(evicted_at.cpu() if hasattr(evicted_at, "cpu") else evicted_at, dtype=np.float64)
    if ev.ndim != 2:
        raise ValueError(f"evicted_at must be [layers, seq_len], got shape {ev.shape}")
    n = ev.shape[1]
    idx = np.unique(np.linspace(0, n - 1, min(n, max_side)).round().astype(np.int64)) if n else np.zeros(0, np.int64)
    q = idx[:, None]
    k = idx[None, :]
    causal = k <= q
    alive = q[None] < ev[:, idx][:, None, :]
    codes = np.where(causal[None], np.where(alive, 2, 1), 0).astype(np.uint8)
    return codes, idx


def plot_replay_mask(evicted_at, prompt_len: int, path: str | os.PathLike, title: str = "replay mask") -> Path:
    """One panel per layer: which keys (x) each query (y) attends to in the replay."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap

    codes, idx = replay_mask_codes(evicted_at)
    layers = codes.shape[0]
    cols = min(4, layers)
    rows = -(-layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows + 0.6), squeeze=False)
    cmap = ListedColormap(["#ffffff", "#f4a582", "#2166ac"])
    n = int(idx[-1]) + 1 if len(idx) else 0
    for l in range(rows * cols):
        ax = axes[l // cols][l % cols]
        if l >= layers:
            ax.axis("off")
            continue
        ax.imshow(codes[l], cmap=cmap, vmin=0, vmax=2, interpolation="nearest",
                  extent=(-0.5, n - 0.5, n - 0.5, -0.5), aspect="auto")
        if 0 < prompt_len < n:
            ax.axvline(prompt_len - 0.5, color="k", lw=0.6, ls="--")
            ax.axhline(prompt_len - 0.5, color="k", lw=0.6, ls="--")
        visible_last = int((codes[l, -1] == 2).sum()) if len(idx) else 0
        ax.set_title(f"layer {l} (last query sees {visible_last}/{len(idx)})", fontsize=8)
        ax.set_xlabel("key position", fontsize=7)
        ax.set_ylabel("query position", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"{title}  (blue: visible, orange: evicted, dashed: end of prompt)", fontsize=9)
    return save_figure(fig, path)


MARKERS = "osD^v<>ph*XP"


def _methods(results: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in results:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def plot_accuracy_vs_reduction(results: list[dict[str, Any]], path: str | os.PathLike, *, k: int = 1,
                               title: str = "accuracy vs peak-KV reduction") -> Path:
    """pass@k (± SE) against peak-KV reduction, one series per method (points joined in ε order).

    The question NGC is about: at the same memory, which eviction rule keeps the most accuracy?
    One marker per method, one point per ε; ``full`` is a black star at 1×. ``results`` are result
    rows (:func:`rlmem.evaluation.results.summarize_run`): ``results.json``'s or ``eval.jsonl``'s.
    """
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
    return save_figure(fig, path, dpi=110)


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
    return save_figure(fig, path, dpi=110)


TRAINING_CURVES = (("reward/mean", "reward"), ("accuracy/mean", "verifier accuracy"),
                   ("eviction/eps", "eviction rate ε (mean over groups)"),
                   ("eviction/peak_kv_mean", "peak KV (tokens, mean over rollouts)"))


def plot_training_curves(runs: dict[str, list[dict[str, Any]]], path: str | os.PathLike, window: int = 3) -> Path:
    """Reward, accuracy, eviction rate and peak-KV reduction over training steps, one line per run.

    ``runs`` maps a label to the rows of its metrics.jsonl; reward and accuracy are also drawn as a
    trailing mean over ``window`` steps (single steps of a small batch are noisy).
    """
    plt = pyplot()

    fig, axes = plt.subplots(1, len(TRAINING_CURVES), figsize=(4 * len(TRAINING_CURVES), 3.2))
    for ax, (key, label) in zip(axes, TRAINING_CURVES):
        for name, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]   # steps are 1-based
            if not pts:
                continue
            xs, ys = zip(*pts)
            noisy = key.startswith(("reward", "accuracy"))
            line, = ax.plot(xs, ys, alpha=0.35 if noisy else 1.0, label=None if noisy else name)
            if noisy:
                smooth = [sum(ys[max(0, i - window + 1): i + 1]) / len(ys[max(0, i - window + 1): i + 1])
                          for i in range(len(ys))]
                ax.plot(xs, smooth, color=line.get_color(), label=name)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


TIMELINE_COLORS = {"rollout": "#4c72b0", "reward": "#dd8452", "learner": "#c44e52", "sync": "#55a868",
                   "eval": "#8172b3", "log": "#bbbbbb", "checkpoint": "#937860"}


def _actor_order(actor: str) -> tuple[int, str]:
    for i, prefix in enumerate(("rollout", "learner", "driver")):
        if actor.startswith(prefix):
            return i, actor
    return 3, actor


def plot_timeline(rows: list[dict[str, Any]], path: str | os.PathLike, title: str = "timeline") -> Path:
    """Gantt chart of a run: one lane per actor (rollout workers, learner ranks, the driver), one bar
    per span coloured by phase, the step number on bars wide enough to hold it. Seconds run from the
    first span; rollouts under another step's learner bar are the overlap of docs/design.md section 5.
    ``rows`` are ``timeline.jsonl`` rows (:mod:`rlmem.run.timeline`)."""
    plt = pyplot()
    from matplotlib.patches import Patch

    if not rows:
        raise ValueError("plot_timeline: no spans to draw")
    t0 = min(r["run_start"] + r["start"] for r in rows)
    actors = sorted({r["actor"] for r in rows}, key=_actor_order)
    lane = {a: i for i, a in enumerate(actors)}
    t_end = max(r["run_start"] + r["end"] for r in rows) - t0
    fig, ax = plt.subplots(figsize=(min(24, max(8, 4 + t_end / 15)), 1.2 + 0.55 * len(actors)))
    for phase, color in TIMELINE_COLORS.items():
        spans = [r for r in rows if r["phase"] == phase]
        if not spans:
            continue
        for r in spans:
            x, w = r["run_start"] + r["start"] - t0, r["end"] - r["start"]
            ax.broken_barh([(x, max(w, t_end * 1e-3))], (lane[r["actor"]] - 0.38, 0.76), facecolors=color,
                           edgecolors="white", linewidth=0.4)
            if phase in ("rollout", "learner") and w > 0.025 * t_end:
                ax.text(x + w / 2, lane[r["actor"]], str(r["step"]), ha="center", va="center", fontsize=7,
                        color="white")
    ax.set_yticks(range(len(actors)), actors)
    ax.invert_yaxis()
    ax.set_xlim(0, t_end * 1.01 or 1)
    ax.set_xlabel("seconds")
    ax.set_title(title)
    present = [p for p in TIMELINE_COLORS if any(r["phase"] == p for r in rows)]
    ax.legend(handles=[Patch(color=TIMELINE_COLORS[p], label=p) for p in present], ncol=len(present),
              loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(actors) < 4 else -0.12), frameon=False,
              fontsize=8)
    return save_figure(fig, path)
