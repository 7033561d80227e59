"""Rollout engines by name: the torch reference engine (``torch``) and any backend registered later.

A factory builds an engine from a model path (an engine may keep weights in its own process, as
vLLM does, so a path rather than a module is what every engine can take). ``available`` says why
an engine cannot run here (``None`` when it can), so configs and CLI flags are refused before
anything starts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from rlmem.dtypes import DTYPE_NAMES, LEARNER_DTYPES, MODEL_DTYPES
from rlmem.engine.base import RolloutEngine


@dataclass(frozen=True)
class EngineTraits:
    """What an engine supports, so configs are refused early and the parity suite sizes its cases."""

    dtypes: tuple[str, ...] = LEARNER_DTYPES   # names from rlmem.dtypes; an exact engine runs what the replay runs
    protect_recent_zero: bool = True   # ragged per-layer caches (protect_recent=0, paper-literal)
    block_multiple: int = 1            # NGC block size must be a multiple of this (paged KV blocks)
    # What the engine frees while a colocated learner steps on the same GPU: "none" (nothing held
    # between generate calls but its weights: the torch engine frees its caches after each call),
    # "cuda" (a sleep mode on CUDA only: vLLM's level-2 sleep frees weights and KV cache).
    sleep_mode: str = "none"


@dataclass(frozen=True)
class EngineEntry:
    factory: str | Callable[..., RolloutEngine]     # callable, or "module:function" imported lazily
    available: Callable[[], str | None]
    traits: EngineTraits = EngineTraits()
    description: str = ""


_ENGINES: dict[str, EngineEntry] = {}


def register_engine(name: str, factory: str | Callable[..., RolloutEngine], *,
                    available: Callable[[], str | None] = lambda: None, traits: EngineTraits = EngineTraits(),
                    description: str = "") -> None:
    if name in _ENGINES:
        raise ValueError(f"engine {name!r} is already registered")
    unknown = [d for d in traits.dtypes if d not in DTYPE_NAMES]
    if unknown:
        raise ValueError(f"engine {name!r}: traits name dtypes {unknown} not in rlmem.dtypes {list(DTYPE_NAMES)}")
    _ENGINES[name] = EngineEntry(factory, available, traits, description)


def engine_names() -> list[str]:
    return list(_ENGINES)


def engine_traits(name: str) -> EngineTraits:
    if name not in _ENGINES:
        raise ValueError(f"unknown engine {name!r}; registered: {', '.join(engine_names())}")
    return _ENGINES[name].traits


def engine_unavailable_reason(name: str) -> str | None:
    """``None`` if engine ``name`` can run here, else why not (unknown name included)."""
    entry = _ENGINES.get(name)
    if entry is None:
        return f"unknown engine {name!r}; registered: {', '.join(engine_names())}"
    return entry.available()


def create_engine(name: str, model_path: str, *, dtype: str | None = None, seed: int = 0, **options) -> RolloutEngine:
    """Build engine ``name`` for the model at ``model_path``; a clear ValueError if it cannot run here.

    ``dtype`` None: the engine's own default (torch: float32; vLLM: bfloat16 on CUDA, float32 on CPU)."""
    why = engine_unavailable_reason(name)
    if why is not None:
        raise ValueError(f"rollout engine {name!r} cannot be used: {why}")
    factory = _ENGINES[name].factory
    if isinstance(factory, str):
        module, func = factory.split(":")
        factory = getattr(importlib.import_module(module), func)
    if dtype is not None:
        options["dtype"] = dtype
    return factory(model_path, seed=seed, **options)


register_engine("torch", "rlmem.engine.reference:from_pretrained",
                description="torch reference engine: any HF causal LM with RoPE, CPU or GPU, physically compacting caches")


def _vllm_unavailable() -> str | None:
    from rlmem.engine.vllm.version import unavailable_reason

    return unavailable_reason()


register_engine("vllm", "rlmem.engine.vllm.engine:from_pretrained", available=_vllm_unavailable,
                traits=EngineTraits(dtypes=MODEL_DTYPES, protect_recent_zero=False,
                                    block_multiple=32,    # CPU attention: multiples of 32 (CUDA: of 16)
                                    sleep_mode="cuda"),
                description="vLLM (pinned 0.32.0) with NGC eviction inside the paged KV cache; freed blocks go back to vLLM's pool")
