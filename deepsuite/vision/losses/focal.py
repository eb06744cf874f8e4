"""Sigmoid focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepsuite.vision.losses._reduce import check_reduction, reduce_loss


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """``FL = −α_t (1 − p_t)^γ log p_t`` with ``p = sigmoid(logits)``, element-wise.

    ``p_t = p`` where the target is 1 and ``1 − p`` where it is 0 (soft targets in [0, 1] interpolate
    both); ``α_t = α`` for positives and ``1 − α`` for negatives; ``alpha < 0`` disables the
    weighting. ``log p_t`` comes from ``binary_cross_entropy_with_logits`` (stable for large
    logits). Computed in float32 at least.
    """
    check_reduction(reduction)
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    targets = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # −log p_t
    p_t = p * targets + (1 - p) * (1 - targets)
    # clamped away from 0: for 0 < γ < 1 the derivative of x**γ at a saturated logit (x = 0) is
    # infinite and gave NaN gradients; the value changes by at most tiny**γ
    loss = ce * (1 - p_t).clamp_min(torch.finfo(p_t.dtype).tiny) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return reduce_loss(loss, reduction)


class FocalLoss(nn.Module):
    """Sigmoid focal loss as a module.

    ``forward(logits, targets)``: ``targets`` either has the shape of ``logits`` (binary / multi-label
    targets in [0, 1]) or is an integer class index tensor with one dimension less (multi-class,
    one-hot encoded over the last logit dimension; a negative index = background, all zeros).

    Args:
        alpha: weight of positives (``1 − alpha`` for negatives); ``< 0`` disables it. Default 0.25.
        gamma: focusing parameter; 0 gives (α-weighted) binary cross-entropy. Default 2.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean") -> None:
        super().__init__()
        check_reduction(reduction)
        if gamma < 0:
            raise ValueError(f"gamma={gamma} must be >= 0")
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Focal loss of ``logits`` against ``targets`` (see the class docstring)."""
        if not targets.is_floating_point() and targets.dim() == logits.dim() - 1:
            num_classes = logits.shape[-1]
            valid = targets >= 0
            one_hot = F.one_hot(targets.clamp(min=0).long(), num_classes) * valid[..., None]
            targets = one_hot
        if targets.shape != logits.shape:
            raise ValueError(
                f"targets {tuple(targets.shape)} must have the shape of logits {tuple(logits.shape)} "
                "or be class indices with the last dimension dropped"
            )
        return sigmoid_focal_loss(logits, targets, self.alpha, self.gamma, self.reduction)
