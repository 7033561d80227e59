"""Rollout engines behind one protocol (:mod:`rlmem.engine.base`), created by name (:mod:`rlmem.engine.registry`)."""

from rlmem.engine.base import GenerationStats, RolloutEngine
from rlmem.engine.registry import (EngineTraits, create_engine, engine_names, engine_traits, engine_unavailable_reason,
                                   register_engine)

__all__ = ["EngineTraits", "GenerationStats", "engine_traits", "RolloutEngine", "create_engine", "engine_names", "engine_unavailable_reason",
           "register_engine"]
