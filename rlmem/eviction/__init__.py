"""NGC eviction: the policy (schedule, scoring, blocks, sampling, log-probability) and the rollout record."""

from rlmem.eviction.policy import EvictionConfig
from rlmem.eviction.record import RolloutRecord, read_jsonl, write_jsonl

__all__ = ["EvictionConfig", "RolloutRecord", "read_jsonl", "write_jsonl"]
