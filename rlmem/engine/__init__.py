"""Rollout engines behind one protocol (:mod:`rlmem.engine.base`), created by name (:mod:`rlmem.engine.registry`)."""

from rlmem.engine.base import GenerationStats, RolloutEngine
from rlmem.engine.registry import create_engine, engine_names, engine_unavailable_reason, register_engine

__all__ = ["GenerationStats", "RolloutEngine", "create_engine", "engine_names", "engine_unavailable_reason",
           "register_engine"]
