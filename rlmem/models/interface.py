"""How rlmem plugs into HF causal LMs: custom attention functions, the RoPE check, decoder/head split.

rlmem never edits modeling code. The engine and the replay each register an attention function
with HF's ``AttentionInterface``; the model is switched to it for one forward pass and receives
rlmem's per-call state through the forward's ``**kwargs`` (which HF passes down to attention).
The model receives post-RoPE queries and keys there, which is exactly what NGC scoring needs.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from transformers import AttentionInterface


def register_attention(name: str, fn: Callable) -> None:
    AttentionInterface.register(name, fn)


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Switch every attention module of ``model`` to the registered function ``name`` for a block."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


def check_supported(model: torch.nn.Module) -> None:
    """NGC needs rotary positions (keys keep their true position after compaction) and attention
    modules that expose ``layer_idx`` and ``scaling``. Raise a clear error otherwise."""
    base = decoder(model)
    cfg = model.config
    if not hasattr(base, "rotary_emb"):
        raise ValueError(
            f"model type {cfg.model_type!r} has no rotary position embeddings (no `rotary_emb` module); "
            "NGC needs RoPE so that surviving keys keep their true positions. Supported: Qwen2/Qwen3/Llama-style models.")
    attn = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling") and hasattr(m, "k_proj")]
    if len(attn) != cfg.num_hidden_layers:
        raise ValueError(f"model type {cfg.model_type!r}: found {len(attn)} attention modules with layer_idx/scaling, "
                         f"expected {cfg.num_hidden_layers}")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
        raise ValueError(f"model type {cfg.model_type!r} uses sliding-window attention, which rlmem does not support")


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body (embeddings + layers + final norm) of a causal LM."""
    body = getattr(model, "model", None)
    if body is None:
        raise ValueError(f"{type(model).__name__}: expected a causal LM with a `.model` decoder (HF layout)")
    return body


def lm_head(model: torch.nn.Module) -> torch.nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__}: no output embeddings (lm_head)")
    return head


def num_layers(model: torch.nn.Module) -> int:
    return int(model.config.num_hidden_layers)
