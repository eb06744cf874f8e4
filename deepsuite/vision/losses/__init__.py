"""Detection and classification losses: focal, GIoU/DIoU box losses, CenterNet."""

from deepsuite.vision.losses.centernet import CenterNetLoss, penalty_reduced_focal_loss
from deepsuite.vision.losses.focal import FocalLoss, sigmoid_focal_loss
from deepsuite.vision.losses.iou import DIoULoss, GIoULoss

__all__ = [
    "CenterNetLoss",
    "DIoULoss",
    "FocalLoss",
    "GIoULoss",
    "penalty_reduced_focal_loss",
    "sigmoid_focal_loss",
]
