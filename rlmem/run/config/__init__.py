"""The run configuration: one typed schema for a whole NGC training run, checked before Ray starts.

A run is one YAML file plus dotted command-line overrides (``algorithm.prompts_per_step=8``):
:mod:`.schema` (the sections, pure data), :mod:`.loading` (YAML, overrides, one
:class:`ConfigError` listing every problem) and :mod:`.checks` (cross-field and file checks).
"""

from rlmem.run.config.checks import check_config, check_files_exist, looks_local
from rlmem.run.config.loading import (
    ConfigError, apply_override, config_from_dict, load_config, parse_override_value,
)
from rlmem.run.config.schema import (
    COUNTDOWN_GENERATED, TINY_MODEL, AlgorithmConfig, BatchSizes, CountdownGenConfig, CurriculumConfig,
    DataConfig, EvalConfig, EvictionSection, EvictionStage, InteroceptionConfig, LearnerSection, LoggingConfig, ModelConfig,
    OptimizerConfig, RayConfig, RolloutConfig, RunConfig, TrainerConfig, policy_config,
)

__all__ = ["COUNTDOWN_GENERATED", "TINY_MODEL", "AlgorithmConfig", "BatchSizes", "ConfigError", "CountdownGenConfig",
           "CurriculumConfig", "DataConfig", "EvalConfig", "EvictionSection", "EvictionStage", "InteroceptionConfig", "LearnerSection",
           "LoggingConfig", "ModelConfig", "OptimizerConfig", "RayConfig", "RolloutConfig", "RunConfig",
           "TrainerConfig", "apply_override", "check_config", "check_files_exist", "config_from_dict", "load_config",
           "looks_local", "parse_override_value", "policy_config"]
