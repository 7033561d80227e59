"""Eviction scorers behind the one NGC schedule: NGC's learned scorer and heuristic baselines.

One file per scorer (as kvpress has one file per press); importing this package registers them.
"""

from rlmem.eviction.scorers.base import (Scorer, ScoringInputs, get_scorer, is_learned, register_scorer,
                                         scorer_names, window_attention)
from rlmem.eviction.scorers import ngc  # noqa: F401  (registers "ngc")
# heuristic baselines (register "knorm", "keydiff", "snapkv", "tova", "h2o", "streamingllm",
# "streamingllm_prompt", "rkv")
from rlmem.eviction.scorers import (h2o, keydiff, knorm, rkv, snapkv, streamingllm,  # noqa: F401
                                    streamingllm_prompt, tova)

__all__ = ["Scorer", "ScoringInputs", "get_scorer", "is_learned", "register_scorer", "scorer_names",
           "window_attention"]
