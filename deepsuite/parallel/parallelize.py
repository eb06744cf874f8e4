"""Parallelism applied from outside the model (DESIGN.md seam 2): activation checkpointing and
torch.compile per transformer block. Module names are unchanged, so checkpoints and HF conversion
see the same state-dict keys whether or not a block is wrapped."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from deepsuite.config.schema import Config
from deepsuite.parallel.dist import ParallelDims
from deepsuite.parallel.expert_parallel import parallelize_experts


def _checkpointed_forward(block: nn.Module, forward: Any, *args: Any, **kwargs: Any) -> Any:
    # Recompute in backward only while training with autograd; generation with a KV cache
    # (no grad) calls the block directly.
    if block.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each element of `model.layers` in backward (non-reentrant); returns how many."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList | nn.ModuleDict):
        raise NotImplementedError(
            f"activation checkpointing needs the model's blocks in `model.layers`; {type(model).__name__} has none"
        )
    blocks = list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)
    for block in blocks:
        # An instance attribute shadows the class's forward; nn.Module.__call__ picks it up.
        block.forward = functools.partial(_checkpointed_forward, block, block.forward)  # type: ignore[method-assign]
    return len(blocks)


def apply_compile(model: nn.Module) -> int:
    """torch.compile each element of `model.layers` in place; returns how many."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList | nn.ModuleDict):
        raise NotImplementedError(
            f"compile needs the model's blocks in `model.layers`; {type(model).__name__} has none"
        )
    blocks = list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)
    for block in blocks:
        block.compile()
    return len(blocks)


def parallelize_model(model: nn.Module, dims: ParallelDims, cfg: Config) -> nn.Module:
    """Apply the configured parallelism to `model` in place and return it.

    Data parallelism and ZeRO come from the DeepSpeed engine; here: activation checkpointing
    (`parallel.activation_checkpointing`) and per-block compilation (`parallel.compile`).
    Expert parallelism (`parallel.ep_size > 1`, ZeRO-1/2/3): each rank keeps E/ep_size routed experts
    and exchanges tokens by all-to-all (`deepsuite.parallel.expert_parallel`); under ZeRO-3 they are
    held outside the engine, whole per EP rank (`HeldExperts`).
    """
    model = parallelize_experts(model, dims.world_size, cfg.parallel.zero_stage, cfg.parallel.ep_size)
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.parallel.compile:
        apply_compile(model)
    return model
