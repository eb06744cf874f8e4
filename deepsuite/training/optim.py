"""The optimizer (torch AdamW with weight-decay groups) and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from deepsuite.config.schema import OptimConfig, ScheduleConfig
from deepsuite.parallel.groups import optimizer_param_groups


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for weight matrices; none for biases, norms, embeddings and any 1-D
    tensor. Tied parameters appear once."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embedding_ids or not _decays(name, p):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _decays(name: str, p: torch.Tensor) -> bool:
    lowered = name.lower()
    return not (p.ndim < 2 or "norm" in lowered or lowered.endswith("bias"))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch AdamW over `param_groups(model)` (handed to DeepSpeed, which needs no JIT build for it).

    Expert-parallel parameters go to extra DeepSpeed "moe" groups (reduced over their
    expert-data-parallel replicas only); without expert parallelism the groups are unchanged.
    """
    groups = [dict(g, name=f"group{i}") for i, g in enumerate(param_groups(model, cfg.weight_decay))]
    return torch.optim.AdamW(
        optimizer_param_groups(groups),
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        fused=cfg.fused or None,
    )


def build_held_expert_optimizer(params: dict[str, nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch AdamW for the experts that ZeRO-3 × EP holds outside the engine
    (`deepsuite.parallel.expert_parallel.HeldExperts`): the hyper-parameters and weight-decay rule of
    `build_optimizer`; its learning rate is set each step to the engine's."""
    decay = [p for n, p in params.items() if _decays(n, p)]
    no_decay = [p for n, p in params.items() if not _decays(n, p)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        fused=cfg.fused or None,
    )


def lr_factor(schedule: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak LR for optimizer step `s` (0-based, `s < total_steps`).

    Warmup: step `s < warmup_steps` uses `(s + 1) / warmup_steps` (the last warmup step is at the
    peak; without warmup, step 0 is). Then cosine or linear decay reaching `min_lr_ratio` at the
    last step, `total_steps - 1` (or constant)."""
    warmup = schedule.warmup_steps
    floor = schedule.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule.decay == "constant":
            return 1.0
        # the last warmup step already ran at the peak; without warmup the first step does
        done = step - warmup + 1 if warmup else step
        progress = min(1.0, done / max(1, total_steps - warmup - (0 if warmup else 1)))
        if schedule.decay == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """`torch.optim.lr_scheduler.LambdaLR` with `lr_factor` (DeepSpeed steps it once per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, total_steps))
