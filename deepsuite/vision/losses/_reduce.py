"""Shared reduction for the vision losses."""

from __future__ import annotations

import torch

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: str) -> None:
    """Raise a ValueError naming the allowed reductions when ``reduction`` is unknown."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; use one of {REDUCTIONS}")


def reduce_loss(loss: torch.Tensor, reduction: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Apply an optional element weight, then ``"none"`` | ``"mean"`` | ``"sum"``.

    ``"mean"`` is the plain mean over elements (weighted or not); an empty input gives 0 for
    ``"mean"`` and ``"sum"`` (with a graph, so ``backward`` still works) instead of NaN.
    """
    if weight is not None:
        loss = loss * weight
    if reduction == "none":
        return loss
    if reduction == "sum" or loss.numel() == 0:
        return loss.sum()
    return loss.mean()
