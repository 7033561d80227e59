"""KV-cache layout adapters: token-level key reads and whole-block copies on vLLM's paged cache.

vLLM 0.32 gives every attention layer a logical view ``[num_blocks, kv_heads, block_size,
2 * head_size]``. How the keys of one block sit in memory depends on the attention backend:

* CPU backend (``cpu_attn.py``), ISA ``vec``/``vec16``: the block is viewed as
  ``[kv_heads, 2 * block_size, head_size]``; its first half holds K transposed,
  ``[head_size, block_size]`` per head (what ``cpu_attn_reshape_and_cache`` writes), the second
  half holds V as ``[block_size, head_size]``. ISA ``amx`` (bf16 on AMX CPUs) prepacks K and is
  not readable token by token, so it is refused.
* CUDA FlashAttention (``flash_attn.py``): K is ``kv_cache[..., :head_size]`` and V the rest,
  indexed ``[block, head, slot, :]`` (the backend views it as ``[block, slot, head, d]``).

NGC's block size equals vLLM's, so compaction moves whole blocks, and a whole-block copy is the
same for every layout. All functions here are plain tensor code (no vLLM import) so CPU tests can
check them for each layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """How to read the post-RoPE keys of a run of blocks out of one layer's cache tensor."""

    name: str

    def read_keys(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Keys of the first ``num_tokens`` slots of ``block_ids`` (in order): ``[kv_heads, num_tokens, d]``."""
        nb, hkv, bs, two_d = kv_cache.shape
        d = two_d // 2
        blocks = kv_cache.index_select(0, block_ids)                       # [n, H, bs, 2d]
        if self.name == "cpu_vec":
            flat = blocks.reshape(len(block_ids), hkv, 2 * bs * d)[:, :, : bs * d]
            k = flat.reshape(len(block_ids), hkv, d, bs).transpose(2, 3)     # [n, H, bs, d]
        elif self.name == "flash_attn":
            k = blocks[..., :d]
        else:
            raise ValueError(f"unknown KV layout {self.name!r}")
        return k.permute(1, 0, 2, 3).reshape(hkv, len(block_ids) * bs, d)[:, :num_tokens]


CPU_VEC = KVLayout("cpu_vec")
FLASH_ATTN = KVLayout("flash_attn")


def layout_for(backend_name: str, isa: str | None = None) -> KVLayout:
    """The adapter for an attention backend (``get_name()`` of vLLM's backend class); clear error otherwise."""
    if backend_name == "CPU_ATTN":
        if isa in ("vec", "vec16", None):
            return CPU_VEC
        raise ValueError(f"vLLM CPU attention ISA {isa!r} stores keys prepacked; the rlmem vLLM backend reads "
                         "keys in the 'vec' layout only (use dtype float32 or float16, or a CPU without AMX)")
    if backend_name in ("FLASH_ATTN", "FLASH_ATTN_VLLM_V1"):
        return FLASH_ATTN
    raise ValueError(f"vLLM attention backend {backend_name!r} has no rlmem KV layout adapter "
                     "(supported: CPU_ATTN, FLASH_ATTN)")


def copy_blocks(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """``kv_cache[dst[i]] = kv_cache[src[i]]`` for all i, gathering every source before writing."""
    if len(src):
        kv_cache.index_copy_(0, dst, kv_cache.index_select(0, src))
