"""IoU-based box regression losses: GIoU and DIoU.

``loss = 1 − GIoU`` (Rezatofighi et al., CVPR 2019) and ``loss = 1 − IoU + ρ²/c²`` (Zheng et al.,
AAAI 2020). Both are in [0, 2]: 0 for identical boxes, above 1 for disjoint ones. Degenerate boxes
(zero width/height, identical points, inverted corners) give finite losses and gradients; see
`deepsuite.vision.boxes`.
"""

from __future__ import annotations

import torch
from torch import nn

from deepsuite.vision.boxes import check_box_format, distance_box_iou, generalized_box_iou, to_xyxy
from deepsuite.vision.losses._reduce import check_reduction, reduce_loss


class _BoxLoss(nn.Module):
    def __init__(self, box_format: str = "xyxy", reduction: str = "mean", eps: float = 1e-7) -> None:
        super().__init__()
        check_box_format(box_format)
        check_reduction(reduction)
        self.box_format = box_format
        self.reduction = reduction
        self.eps = eps

    def _similarity(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``pred`` and ``target`` boxes ``(..., 4)`` in ``box_format``; optional ``weight`` ``(...)``.

        Returns the per-box loss ``(...)`` for ``reduction="none"``, else a scalar.
        """
        if pred.shape != target.shape:
            raise ValueError(
                f"pred {tuple(pred.shape)} and target {tuple(target.shape)} boxes differ in shape"
            )
        pred_xyxy = to_xyxy(pred, self.box_format)
        target_xyxy = to_xyxy(target, self.box_format)
        loss = 1.0 - self._similarity(pred_xyxy, target_xyxy)
        return reduce_loss(loss, self.reduction, weight)


class GIoULoss(_BoxLoss):
    """``1 − GIoU(pred, target)`` per box pair.

    Args:
        box_format: ``"xyxy"`` or ``"cxcywh"``.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        eps: added to every denominator (keeps zero-area boxes finite).
    """

    def _similarity(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return generalized_box_iou(pred, target, self.eps)


class DIoULoss(_BoxLoss):
    """``1 − IoU + ρ²(centres)/c²(enclosing diagonal)`` per box pair; arguments as `GIoULoss`."""

    def _similarity(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return distance_box_iou(pred, target, self.eps)
