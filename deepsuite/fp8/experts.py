"""FP8 for stacked routed experts (``deepsuite.layers.moe.GroupedExperts``)."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from torch import nn

from deepsuite.config.schema import FP8Config

if TYPE_CHECKING:
    from deepsuite.fp8 import FP8Context


def convert_grouped_experts(model: nn.Module, ctx: FP8Context, cfg: FP8Config) -> None:
    """Convert every ``GroupedExperts`` in ``model`` (none before the MoE layer exists)."""
    if importlib.util.find_spec("deepsuite.layers.moe") is None:
        return
    from deepsuite.layers.moe import GroupedExperts

    for name, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            ctx.skipped[name] = "stacked experts: FP8 conversion not implemented yet"
