"""DeepSeek-V3: MLA, DeepSeekMoE, multi-token prediction (config and flavors are torch-free)."""

from deepsuite.models.deepseek_v3.config import ARGS_CLASS, FLAVORS, DeepSeekV3Config, count_parameters

__all__ = ["ARGS_CLASS", "FLAVORS", "DeepSeekV3Config", "count_parameters"]
