"""KV-cache layout adapters: token-level key reads and whole-block copies on vLLM's paged cache.

vLLM 0.32 gives every attention layer a logical view ``[num_blocks, kv_heads, block_size,
2 * head_size]``. How the keys of one block sit in memory depends on the attention backend:

* CPU backend (``cpu_attn.py``), ISA ``vec``/``vec16``: the block is viewed as
  ``[kv_heads, 2 * block_size, head_size]``; its first half holds K transposed,
  ``[head_size, block_size]`` per head (what ``cpu_attn_reshape_and_cache`` writes), the second
  half holds V as ``[block_size, head_size]``. ISA ``amx`` (bf16 on AMX CPUs) prepacks K and is
  not readable token by token, so it is refused.
* CUDA FlashAttention (``flash_attn.py``): K is ``kv_cache[..., :head_size]`` and V the rest,
  indexed ``[block, head, slot, :]`` (the backend views it as ``[block, slot, head, d]``). The
  reader indexes the logical view, so it holds for any physical stride order; the ones rlmem has
  tested (tests/test_vllm_units.py, written by vLLM's own ``do_kv_cache_update``) are accepted.

Which backend and which physical layout are read from vLLM itself when the worker installs: the
backend class vLLM picked for the attention layers (``get_name()``), the resolved
``CacheConfig.kv_cache_layout`` (vLLM 0.32's ``KVCacheLayout``: a stride permutation of the logical
``[L, B, H, N, C]``; FlashAttention declares no preference, so vLLM takes its default ``LBNHC``,
vllm/v1/attention/backends/utils.py:196; the CPU backend asks for ``LBHNC``, cpu_attn.py:73), and
the strides of the layer's cache tensor, which must agree with that name. Anything else is refused
in one line.

dtype on CUDA: FlashAttention takes only fp16/bf16 (vllm/v1/attention/backends/flash_attn.py:287,
``supported_dtypes``; refused by ``validate_configuration``, vllm/v1/attention/backend.py:302), and
the CUDA platform's next choices are FlashInfer (fp16/bf16 too, flashinfer.py:447) then TRITON_ATTN
(vllm/platforms/cuda.py:174-176), which takes fp32. So fp32 on CUDA gets TRITON_ATTN, which rlmem
has no reader for: :class:`rlmem.engine.vllm.engine.VllmEngine` runs CUDA in bf16 by default and
refuses fp32 there before vLLM starts.

NGC's block size equals vLLM's, so compaction moves whole blocks, and a whole-block copy is the
same for every layout. All functions here are plain tensor code (no vLLM import) so CPU tests can
check them for each layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# vLLM 0.32's KVCacheLayout members (vllm/v1/kv_cache_layout.py) as the physical order of the per-layer
# logical view [B, H, N, C] (its ``layer_view_order``), kept here so this module needs no vLLM import;
# tests/test_vllm_units.py checks them against vLLM's enum.
LAYER_VIEW_ORDER: dict[str, tuple[int, ...]] = {
    "LBHNC": (0, 1, 2, 3), "LBNHC": (0, 2, 1, 3), "LHBNC": (1, 0, 2, 3),
    "BLHNC": (0, 1, 2, 3), "BLNHC": (0, 2, 1, 3), "BHLNC": (0, 1, 2, 3),
}


@dataclass(frozen=True)
class KVLayout:
    """How to read the post-RoPE keys of a run of blocks out of one layer's cache tensor."""

    name: str
    cache_layouts: tuple[str, ...] = ()    # vLLM physical layouts this reader is tested on

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


# the CPU reader reshapes a whole block as [H, 2*N*d]: the block interior must be head-major (LBHNC)
CPU_VEC = KVLayout("cpu_vec", ("LBHNC",))
FLASH_ATTN = KVLayout("flash_attn", ("LBNHC", "LBHNC"))


def layout_for(backend_name: str, isa: str | None = None, cache_layout: str | None = None) -> KVLayout:
    """The adapter for an attention backend (``get_name()`` of vLLM's backend class) and, when given,
    vLLM's resolved physical cache layout (``CacheConfig.kv_cache_layout``); one-line error otherwise."""
    if backend_name == "CPU_ATTN":
        if isa not in ("vec", "vec16", None):
            raise ValueError(f"vLLM CPU attention ISA {isa!r} stores keys prepacked; the rlmem vLLM backend reads "
                             "keys in the 'vec' layout only (use dtype float32 or float16, or a CPU without AMX)")
        layout = CPU_VEC
    elif backend_name in ("FLASH_ATTN", "FLASH_ATTN_VLLM_V1"):
        layout = FLASH_ATTN
    else:
        raise ValueError(f"vLLM attention backend {backend_name!r} has no rlmem KV layout adapter "
                         "(supported: CPU_ATTN, FLASH_ATTN; on CUDA FlashAttention needs dtype bfloat16 or float16)")
    if cache_layout is not None and cache_layout not in layout.cache_layouts:
        raise ValueError(f"vLLM KV cache layout {cache_layout!r} with backend {backend_name} has no rlmem reader "
                         f"(supported: {', '.join(layout.cache_layouts)}; unset VLLM_KV_CACHE_LAYOUT)")
    return layout


def physical_order(view: torch.Tensor) -> tuple[int, ...]:
    """The axes of a strided view in memory order, outermost first (size-1 axes left out: any stride fits them)."""
    axes = [i for i in range(view.dim()) if view.shape[i] > 1]
    return tuple(sorted(axes, key=lambda i: -view.stride(i)))


def check_cache_view(kv_cache: torch.Tensor, cache_layout: str, *, num_kv_heads: int, head_size: int,
                     block_size: int) -> None:
    """The layer's cache tensor is vLLM's logical ``[blocks, kv_heads, block_size, 2*head_size]`` view
    laid out as ``cache_layout`` says (its strides, not only the name); one-line ValueError otherwise."""
    want = (num_kv_heads, block_size, 2 * head_size)
    if kv_cache.dim() != 4 or tuple(kv_cache.shape[1:]) != want:
        raise ValueError(f"vLLM KV cache view has shape {tuple(kv_cache.shape)}; rlmem reads "
                         f"[num_blocks, {want[0]}, {want[1]}, {want[2]}] (kv heads, block size, 2 x head size)")
    order = LAYER_VIEW_ORDER.get(cache_layout)
    if order is None:
        raise ValueError(f"vLLM KV cache layout {cache_layout!r} is unknown to rlmem (known: {', '.join(LAYER_VIEW_ORDER)})")
    expect = tuple(i for i in order if kv_cache.shape[i] > 1)
    got = physical_order(kv_cache)
    if got != expect or kv_cache.stride(3) != 1:
        raise ValueError(f"vLLM KV cache view strides {tuple(kv_cache.stride())} are not layout {cache_layout} "
                         f"(axes in memory {got}, expected {expect})")


def copy_blocks(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """``kv_cache[dst[i]] = kv_cache[src[i]]`` for all i, gathering every source before writing."""
    if len(src):
        kv_cache.index_copy_(0, dst, kv_cache.index_select(0, src))
