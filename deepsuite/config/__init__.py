"""Typed run configuration: schema, YAML/CLI loading and validation. Imports no torch."""

from deepsuite.config.docs import field_docs
from deepsuite.config.errors import ConfigError
from deepsuite.config.loader import (
    MODEL_FAMILIES,
    config_from_dict,
    config_to_dict,
    dump_config,
    family_module,
    load_config,
    parse_override,
    resolve_model_args,
)
from deepsuite.config.schema import (
    SECTIONS,
    AttentionConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    FP8Config,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    ScheduleConfig,
    TrainingConfig,
)

__all__ = [
    "MODEL_FAMILIES",
    "SECTIONS",
    "AttentionConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "FP8Config",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "ScheduleConfig",
    "TrainingConfig",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "family_module",
    "field_docs",
    "load_config",
    "parse_override",
    "resolve_model_args",
]
