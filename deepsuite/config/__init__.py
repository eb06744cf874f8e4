"""Typed run configuration: schema, YAML/CLI loading and validation. Imports no torch."""

from deepsuite.config.docs import field_docs
from deepsuite.config.errors import ConfigError
from deepsuite.config.families import MODEL_FAMILIES, Family, get_family
from deepsuite.config.loader import (
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
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
    "Family",
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
    "field_docs",
    "get_family",
    "load_config",
    "parse_override",
]
