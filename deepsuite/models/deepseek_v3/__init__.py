"""DeepSeek-V3: MLA, DeepSeekMoE, multi-token prediction (config and flavors are torch-free)."""

from deepsuite.models.deepseek_v3.config import FLAVORS, DeepSeekV3Config, count_parameters

__all__ = ["FLAVORS", "DeepSeekV3Config", "count_parameters"]
