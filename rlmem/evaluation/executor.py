"""Who generates an evaluation's samples: the seam between the pipeline and the engines.

The pipeline (:mod:`rlmem.evaluation.pipeline`) hands an executor jobs: "generate these prompt ids
with this eviction config and these sampling params, in evaluation mode (top-k evictions)", and
gets one list of records per job, in order. A job carries its own seed, so its records do not
depend on which executor, worker or engine instance ran it.

* :class:`EngineExecutor`: one local engine, jobs one at a time (``rlmem eval``);
* ``rlmem.train.rollouts.WorkerExecutor``: the run's rollout workers, one job per worker at a
  time (the in-training evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from rlmem.engine.sampling import SamplingParams
from rlmem.eviction.policy import EvictionConfig
from rlmem.eviction.record import RolloutRecord


@dataclass
class GenerationJob:
    prompt_ids: list[list[int]]
    eviction: EvictionConfig | None     # one config for every prompt of the job (None: full cache)
    sampling: SamplingParams


class Executor(Protocol):
    parallel: int                       # jobs it runs at once (the pipeline hands it that many)

    def generate(self, jobs: list[GenerationJob]) -> list[list[RolloutRecord]]:
        """Records of each job (one per prompt, in order), evictions in evaluation mode (top-k)."""
        ...


class EngineExecutor:
    """Jobs on one local engine, built by ``make_engine`` on first use (nothing left to sample: never)."""

    parallel = 1

    def __init__(self, make_engine: Callable[[], object]):
        self.make_engine = make_engine
        self.engine = None

    def generate(self, jobs: list[GenerationJob]) -> list[list[RolloutRecord]]:
        if self.engine is None:
            self.engine = self.make_engine()
        return [self.engine.generate(j.prompt_ids, j.sampling, j.eviction, greedy_evictions=True) for j in jobs]
