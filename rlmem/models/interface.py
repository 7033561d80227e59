"""How rlmem plugs into HF causal LMs: custom attention functions, the RoPE check, decoder/head split.

rlmem never edits modeling code. It registers one attention function with HF's
``AttentionInterface`` and installs it on the model; the engine and the replay pass their per-call
state through the forward's ``**kwargs`` (which HF passes down to attention), and the function
routes each call to the right handler.
The model receives post-RoPE queries and keys there, which is exactly what NGC scoring needs.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


ATTENTION_NAME = "rlmem"
_HANDLERS: dict[str, Callable] = {}


def register_attention(kwarg: str, fn: Callable) -> None:
    """Route attention calls that carry ``kwarg`` (e.g. ``rlmem_replay=state``) to ``fn``."""
    _HANDLERS[kwarg] = fn


def _dispatch_attention(module, query, key, value, attention_mask, **kwargs):
    """rlmem's one attention function: the engine or the replay when their state is in the
    forward's kwargs, HF's SDPA attention otherwise (so an installed model still works normally).

    It stays installed: with gradient checkpointing, backward re-runs the layers with the same
    kwargs after the forward returned, and must reach the same masked attention again.
    """
    for name, fn in _HANDLERS.items():
        state = kwargs.pop(name, None)
        if state is not None:
            return fn(module, query, key, value, attention_mask, state=state, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, _dispatch_attention)
# HF builds masks for a model's attention implementation; ours are SDPA masks for ordinary calls
# (padding, causality) and are ignored when the engine or the replay builds its own.
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def install(model: torch.nn.Module) -> None:
    """Switch every attention module of ``model`` to rlmem's dispatcher (idempotent, O(1) once done:
    the engine calls it before every decode step)."""
    if getattr(model, "_rlmem_installed", False) and model.config._attn_implementation == ATTENTION_NAME:
        return
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and cfg._attn_implementation != ATTENTION_NAME:
            cfg._attn_implementation = ATTENTION_NAME
    model._rlmem_installed = True


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
