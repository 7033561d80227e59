"""Index arithmetic of an NGC round on a paged cache (plain Python/tensors, no vLLM).

With NGC's block size equal to vLLM's KV block size, the alive keys of a request occupy the first
``n_alive`` slots of its block list, NGC block ``j`` is vLLM block ``j``, and a round keeps ``K``
whole blocks (the newest, possibly partial, block always among them when ``protect_recent >= 1``).
The scheduler knows ``K`` before any decision (it depends only on ``n_alive``), so it frees the
tail of the block list at once; the worker then moves the kept blocks to the front.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlmem.eviction.policy import EvictionConfig, keep_count, num_blocks


@dataclass(frozen=True)
class Shrink:
    """One round on one request: ``num_blocks`` before, ``keep`` after, the alive count after."""

    n_alive: int
    num_blocks: int
    keep: int
    new_len: int

    @property
    def freed(self) -> int:
        return self.num_blocks - self.keep


def plan_round(n_alive: int, cfg: EvictionConfig) -> Shrink:
    """Blocks kept by a round on ``n_alive`` keys; all layers keep the same count (protect_recent >= 1)."""
    if cfg.protect_recent < 1:
        raise ValueError("eviction.protect_recent: the vLLM engine needs >= 1 (one block table per request "
                         "requires every layer to keep the same number of tokens)")
    n = num_blocks(n_alive, cfg.block_size)
    k = keep_count(n, cfg.eps, cfg.protect_recent)
    return Shrink(n_alive, n, k, n_alive - (n - k) * cfg.block_size)


def block_moves(block_ids: list[int], kept_eligible: list[int], plan: Shrink, protect_recent: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and destination block ids that move a layer's kept blocks to the front of the list.

    Kept blocks keep their order; block ``i`` of the result comes from the ``i``-th kept block, so
    a source never lies before its destination and a gather-then-scatter copy is safe. Blocks that
    are already in place are left out.
    """
    n = plan.num_blocks
    kept = sorted(set(kept_eligible) | set(range(max(0, n - protect_recent), n)))
    if len(kept) != plan.keep:
        raise ValueError(f"round keeps {len(kept)} blocks, the plan says {plan.keep}")
    src = [block_ids[j] for i, j in enumerate(kept) if i != j]
    dst = [block_ids[i] for i, j in enumerate(kept) if i != j]
    return torch.tensor(src, dtype=torch.long), torch.tensor(dst, dtype=torch.long)


def effective_slots(positions: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Cache slots of the step's tokens: the true positions minus each token's request offset.

    RoPE keeps the true positions; what attention reads (``seq_lens``) and where new K/V go
    (the slot mapping) use the compacted length (docs/design.md section 1, "Replay mask": positions keep counting).
    """
    return positions - offsets


def window_index(n_new: list[int], token_starts: list[int], slots: list[int], window: int, num_slots: int
                 ) -> torch.Tensor:
    """Rows, in ``cat([buffer.view(num_slots * window, ...), step_queries])``, of each request's new window.

    Request ``r`` had the window ``buffer[slots[r]]`` (oldest first) and this step adds ``n_new[r]``
    queries starting at row ``token_starts[r]`` of the step's queries; its new window is the last
    ``window`` of the concatenation. Returns ``[R, window]``.
    """
    out = torch.empty(len(n_new), window, dtype=torch.long)
    base = num_slots * window
    for r, (n, s, slot) in enumerate(zip(n_new, token_starts, slots)):
        seq = list(range(slot * window, (slot + 1) * window)) + list(range(base + s, base + s + n))
        out[r] = torch.tensor(seq[-window:])
    return out
