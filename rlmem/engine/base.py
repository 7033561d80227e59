"""The engine seam: what every rollout engine provides (docs/design.md section 3, engines).

An engine turns prompts into rollout records (docs/design.md section 2) while running the NGC
schedule with the shared policy (:mod:`rlmem.eviction.policy`), takes new weights from the learner,
and reports counters of its last call. Engines are created by name through
:mod:`rlmem.engine.registry`; rollout workers, the CLI (``--backend``) and the benchmarks only
ever see this protocol, and the parity suite runs over every registered engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol, runtime_checkable

import torch

from rlmem.engine.sampling import SamplingParams
from rlmem.eviction.policy import EvictionConfig
from rlmem.eviction.record import RolloutRecord


@dataclass
class GenerationStats:
    """Counters of the last ``generate`` call (for benchmarks and logs)."""

    new_tokens: int = 0
    seconds: float = 0.0
    rounds: int = 0
    peak_cache_bytes: int = 0
    per_row_peak: list[int] = field(default_factory=list)


@runtime_checkable
class RolloutEngine(Protocol):
    name: str
    num_layers: int
    last_stats: GenerationStats

    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 eviction: EvictionConfig | list[EvictionConfig | None] | None = None, *,
                 greedy_evictions: bool = False) -> list[RolloutRecord]:
        """One completion per prompt; ``eviction`` is one config or one per prompt (None = full cache).
        ``greedy_evictions`` takes the top-k blocks instead of sampling (evaluation)."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy ``(name, tensor)`` pairs (HF parameter names) into the running engine."""
        ...
