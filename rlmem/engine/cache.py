"""Per-layer KV caches that are physically compacted at each eviction round.

Each layer holds ``K, V: [B, Hkv, C, d]`` where row ``i`` uses slots ``[0, length[l][i])`` in
position order; capacity ``C`` follows the longest row (grown in chunks, shrunk after rounds), so
evicted entries really free memory. RoPE was applied with the true position before a key entered
the cache (docs/design.md section 1, "Replay mask": positions keep counting); the positions are kept beside the
keys for scorers that rank by position (StreamingLLM). The last ``w`` post-RoPE queries of every
layer are kept for scoring, and so is a per-key ``state`` for scorers that accumulate over steps.
"""

from __future__ import annotations

import torch


class CompactingKVCache:
    def __init__(self, num_layers: int, batch: int, window: int, chunk: int = 64):
        self.num_layers = num_layers
        self.batch = batch
        self.window = max(window, 1)
        self.chunk = chunk
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.queries: list[torch.Tensor | None] = [None] * num_layers   # [B, Hq, w, d], oldest first
        self.positions: list[torch.Tensor | None] = [None] * num_layers  # [B, C] true positions, -1 = empty
        self.state: list[torch.Tensor | None] = [None] * num_layers      # [B, C] scorer state (H2O), lazily made
        self.lengths = torch.zeros(num_layers, batch, dtype=torch.long)

    # ------------------------------------------------------------------ writes
    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor) -> None:
        """Store a right-padded prompt block (``[B, H, P, d]``) whose row ``i`` has ``lens[i]`` tokens."""
        bsz, hkv, p, d = k.shape
        cap = p + self.chunk
        self.keys[layer] = k.new_zeros(bsz, hkv, cap, d)
        self.values[layer] = v.new_zeros(bsz, hkv, cap, d)
        self.keys[layer][:, :, :p] = k
        self.values[layer][:, :, :p] = v
        idx_p = torch.arange(cap, device=k.device)[None, :].expand(bsz, cap)
        self.positions[layer] = torch.where(idx_p < lens.to(k.device)[:, None], idx_p, torch.full_like(idx_p, -1))
        self.state[layer] = None
        self.lengths[layer] = lens.cpu()
        # last w queries of each row: positions lens[i]-w .. lens[i]-1 (fewer if the prompt is short)
        w = self.window
        idx = (lens.to(q.device)[:, None] - w + torch.arange(w, device=q.device)[None, :]).clamp_min(0)
        self.queries[layer] = torch.gather(q, 2, idx[:, None, :, None].expand(bsz, q.shape[1], w, q.shape[-1]))

    def append(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Append one token per row (``[B, H, 1, d]``, true positions ``pos [B]``) at each row's own length."""
        lens = self.lengths[layer]
        need = int(lens.max()) + 1
        if need > self.keys[layer].shape[2]:
            self._resize(layer, need + self.chunk)
        rows = torch.arange(self.batch, device=k.device)
        slot = lens.to(k.device)
        self.keys[layer][rows, :, slot] = k[:, :, 0]
        self.values[layer][rows, :, slot] = v[:, :, 0]
        self.positions[layer][rows, slot] = pos.to(k.device)
        if self.state[layer] is not None:
            self.state[layer][rows, slot] = 0
        self.lengths[layer] = lens + 1
        self.queries[layer] = torch.cat([self.queries[layer][:, :, 1:], q], dim=2)

    def compact(self, layer: int, row: int, keep_slots: list[int]) -> None:
        """Move the surviving entries of ``row`` to the front, in order; the rest is evicted."""
        idx = torch.tensor(keep_slots, dtype=torch.long, device=self.keys[layer].device)
        n = len(keep_slots)
        self.keys[layer][row, :, :n] = self.keys[layer][row, :, idx]
        self.values[layer][row, :, :n] = self.values[layer][row, :, idx]
        for per_slot in (self.positions, self.state):
            if per_slot[layer] is not None:
                t = per_slot[layer]
                t[row, :n] = t[row, idx].clone()
                t[row, n:] = -1 if per_slot is self.positions else 0
        self.lengths[layer, row] = n

    def shrink(self) -> None:
        """Release capacity no row needs any more (called after a round)."""
        for layer in range(self.num_layers):
            need = int(self.lengths[layer].max()) + self.chunk
            if need < self.keys[layer].shape[2]:
                self._resize(layer, need)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of the batch (finished sequences leave the batch)."""
        for layer in range(self.num_layers):
            dev = self.keys[layer].device
            r = rows.to(dev)
            need = int(self.lengths[layer, rows].max()) + self.chunk
            self.keys[layer] = self.keys[layer][r, :, :need].contiguous()
            self.values[layer] = self.values[layer][r, :, :need].contiguous()
            self.queries[layer] = self.queries[layer][r]
            self.positions[layer] = self.positions[layer][r, :need].contiguous()
            if self.state[layer] is not None:
                self.state[layer] = self.state[layer][r, :need].contiguous()
        self.lengths = self.lengths[:, rows]
        self.batch = len(rows)

    # ------------------------------------------------------------------ reads
    def view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``K, V [B, Hkv, Lmax, d]`` and ``valid [B, Lmax]`` for attention over the cache."""
        lens = self.lengths[layer]
        lmax = int(lens.max())
        k = self.keys[layer][:, :, :lmax]
        v = self.values[layer][:, :, :lmax]
        valid = torch.arange(lmax)[None, :] < lens[:, None]
        return k, v, valid.to(k.device)

    def slot_positions(self, layer: int) -> torch.Tensor:
        """True positions ``[B, Lmax]`` of the slots :meth:`view` returns (-1 where empty)."""
        return self.positions[layer][:, : int(self.lengths[layer].max())]

    def scorer_state(self, layer: int) -> torch.Tensor:
        """The per-key scorer state ``[B, capacity]`` of a layer (zeros when first asked for)."""
        if self.state[layer] is None:
            k = self.keys[layer]
            self.state[layer] = torch.zeros(k.shape[0], k.shape[2], dtype=torch.float32, device=k.device)
        return self.state[layer]

    def held(self, row: int) -> int:
        """Entries the fullest layer of batch slot ``row`` holds now (what the peak-KV rule counts)."""
        return int(self.lengths[:, row].max())

    def nbytes(self) -> int:
        """Bytes held by keys and values (physical capacity, not just the used slots)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    # ------------------------------------------------------------------ internals
    def _resize(self, layer: int, cap: int) -> None:
        keep = min(cap, self.keys[layer].shape[2])
        for store in (self.keys, self.values):
            old = store[layer]
            new = old.new_zeros(old.shape[0], old.shape[1], cap, old.shape[3])
            new[:, :, :keep] = old[:, :, :keep]
            store[layer] = new
        for store, fill in ((self.positions, -1), (self.state, 0)):
            old = store[layer]
            if old is not None:
                new = torch.full((old.shape[0], cap), fill, dtype=old.dtype, device=old.device)
                new[:, :keep] = old[:, :keep]
                store[layer] = new
