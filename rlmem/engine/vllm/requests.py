"""The NGC settings a request carries through vLLM (``SamplingParams.extra_args["rlmem"]``).

Both the scheduler and the worker read them from the request's sampling parameters, so per-request
eviction settings (ε under a curriculum, full cache for some prompts) need no side channel.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlmem.eviction.policy import EvictionConfig

KEY = "rlmem"


@dataclass(frozen=True)
class RequestNGC:
    key: str | None               # our own id for the request (vLLM's ids may be rewritten); None: a served
                                  # request, whose decisions nobody reads back (dropped when it finishes)
    config: EvictionConfig | None  # None: full cache
    greedy: bool = False          # top-k evictions (evaluation) instead of Gumbel-top-k


def to_extra_args(key: str, cfg: EvictionConfig | None, greedy: bool) -> dict:
    return {KEY: {"key": key, "eviction": cfg.to_dict() if cfg is not None and cfg.enabled else None,
                  "greedy": bool(greedy)}}


def from_sampling_params(sp) -> RequestNGC | None:
    """The request's NGC settings, or None for a request that did not come from the rlmem engine."""
    extra = getattr(sp, "extra_args", None) or {}
    d = extra.get(KEY)
    if d is None:
        return None
    ev = d.get("eviction")
    return RequestNGC(d["key"], EvictionConfig(**ev) if ev else None, bool(d.get("greedy", False)))
