"""DeepSeek-V3 model arguments, named flavors and parameter counting (defined torch-free in
`deepsuite.config.families.deepseek_v3`, where the config loader builds and validates them)."""

from deepsuite.config.families.deepseek_v3 import FLAVORS, DeepSeekV3Config, count_parameters

__all__ = ["FLAVORS", "DeepSeekV3Config", "count_parameters"]
