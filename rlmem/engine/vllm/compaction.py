"""Index arithmetic of an NGC round on a paged cache (plain Python/tensors, no vLLM).

With NGC's block size equal to vLLM's KV block size, the alive keys of a request occupy the first
``n_alive`` slots of its block list, NGC block ``j`` is vLLM block ``j``, and a round keeps ``K``
whole blocks (the newest, possibly partial, block always among them when ``protect_recent >= 1``).
The scheduler knows ``K`` before any decision (it depends only on ``n_alive``), so it frees the
tail of the block list at once; the worker then moves the kept blocks to the front.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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


def cache_positions(positions: torch.Tensor, row_offsets: np.ndarray, query_start_loc: np.ndarray) -> torch.Tensor:
    """Positions of the step's tokens in the compacted cache: each token's true position minus its
    request's offset (true length minus cache length); the slot mapping is built from these.

    ``row_offsets[i]`` is request row ``i``'s offset, ``query_start_loc[i]:query_start_loc[i + 1]``
    its tokens in the step (``positions`` holds exactly those tokens). RoPE keeps the true positions;
    what attention reads (``seq_lens``) and where new K/V go (the slot mapping) use the compacted
    length (docs/design.md section 1, "Replay mask": positions keep counting).
    """
    n = len(row_offsets)
    per_token = torch.from_numpy(np.repeat(row_offsets, np.diff(query_start_loc[: n + 1])))
    return positions - per_token.to(positions.device, positions.dtype)
