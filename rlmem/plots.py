"""Pictures people would rather look at than read: what a rollout evicted, layer by layer."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rlmem.eviction.record import NEVER, RolloutRecord, evicted_at


def plot_eviction_strip(record: RolloutRecord, num_layers: int, path: str | os.PathLike, title: str = "") -> Path:
    """Layers (y) × key positions (x), coloured by the round that evicted each key (grey: kept).

    The end of the prompt is marked; round times are ticked on top. Reading across a row shows
    which stretches of the reasoning a layer dropped and when.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
