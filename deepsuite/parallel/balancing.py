"""Aux-loss-free expert balancing (DeepSeek-V3): after each optimizer step every MoE layer's router
bias moves by `rate · sign(mean_load − load)`, with the load counted over the whole world."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepsuite.parallel.dist import all_reduce_sum


def moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every MoE layer following the balancing hooks (`tokens_per_expert`, `update_bias`)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if hasattr(m, "update_bias") and isinstance(getattr(m, "tokens_per_expert", None), torch.Tensor)
    ]


@torch.no_grad()
def update_router_biases(model: nn.Module, rate: float) -> dict[str, float]:
    """All-reduce the per-expert token counts of every MoE layer (one flat tensor), update each
    router bias, and return `{"<layer>/load_max_over_mean": …}` plus the overall maximum.

    With `rate == 0` the counts are still reduced, reported and reset (the biases do not move).
    """
    layers = moe_layers(model)
    if not layers:
        return {}
    loads: list[torch.Tensor] = [m.tokens_per_expert.float() for _, m in layers]  # type: ignore[union-attr,misc]
    flat = all_reduce_sum(torch.cat(loads))  # one collective for all layers
    stats: dict[str, float] = {}
    worst = 0.0
    offset = 0
    for (name, module_), load in zip(layers, loads):
        module: Any = module_
        global_load = flat[offset : offset + load.numel()]
        offset += load.numel()
        mean = float(global_load.mean())
        ratio = float(global_load.max()) / mean if mean > 0 else 0.0
        stats[f"expert_load/{name}"] = ratio
        worst = max(worst, ratio)
        module.update_bias(global_load.to(module.tokens_per_expert.device), rate)
    stats["expert_load/max_over_mean"] = worst
    return stats
