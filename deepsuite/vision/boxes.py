"""Box formats, element-wise IoU/GIoU/DIoU and the pairwise IoU matrix.

Formats: ``"xyxy"`` = (x1, y1, x2, y2) corners, ``"cxcywh"`` = (centre x, centre y, width, height).
Boxes are tensors ``(..., 4)``. Widths and heights below zero (an "inverted" predicted box) are
clamped to zero, so every area is ≥ 0 and degenerate boxes (zero area, single points) give finite
values and finite gradients: there is no square root anywhere and every ratio has ``eps`` in its
denominator.
"""

from __future__ import annotations

import torch

BOX_FORMATS = ("xyxy", "cxcywh")


def check_box_format(box_format: str) -> None:
    """Raise a ValueError naming the allowed formats when ``box_format`` is unknown."""
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format={box_format!r} is not supported; use one of {BOX_FORMATS}")


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) → (x1, y1, x2, y2)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(x1, y1, x2, y2) → (cx, cy, w, h)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((0.5 * (x1 + x2), 0.5 * (y1 + y2), x2 - x1, y2 - y1), dim=-1)


def to_xyxy(boxes: torch.Tensor, box_format: str) -> torch.Tensor:
    """Convert ``boxes`` given in ``box_format`` to xyxy."""
    check_box_format(box_format)
    if boxes.shape[-1] != 4:
        raise ValueError(
            f"boxes must have 4 coordinates in the last dimension, got shape {tuple(boxes.shape)}"
        )
    return cxcywh_to_xyxy(boxes) if box_format == "cxcywh" else boxes


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of xyxy boxes ``(..., 4)`` → ``(...)``; inverted boxes have area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _intersection_union(
    boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Element-wise intersection, union and IoU of broadcastable xyxy boxes."""
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter, union, inter / (union + eps)


def _enclosing(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Width and height of the smallest box enclosing both."""
    top_left = torch.minimum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    return wh[..., 0], wh[..., 1]


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Element-wise IoU of broadcastable xyxy boxes ``(..., 4)`` → ``(...)``."""
    return _intersection_union(boxes1, boxes2, eps)[2]


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Element-wise GIoU (Rezatofighi et al. 2019): ``IoU − (C − U) / C``, C the enclosing area.

    In [-1, 1]; 1 for identical boxes, below 0 for disjoint ones.
    """
    _, union, iou = _intersection_union(boxes1, boxes2, eps)
    enclose_w, enclose_h = _enclosing(boxes1, boxes2)
    enclose = enclose_w * enclose_h
    return iou - (enclose - union) / (enclose + eps)


def distance_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Element-wise DIoU (Zheng et al. 2020): ``IoU − ρ²(centres) / c²``, c the enclosing diagonal."""
    iou = _intersection_union(boxes1, boxes2, eps)[2]
    enclose_w, enclose_h = _enclosing(boxes1, boxes2)
    diagonal_sq = enclose_w**2 + enclose_h**2
    centre1 = 0.5 * (boxes1[..., :2] + boxes1[..., 2:])
    centre2 = 0.5 * (boxes2[..., :2] + boxes2[..., 2:])
    centre_dist_sq = ((centre1 - centre2) ** 2).sum(-1)
    return iou - centre_dist_sq / (diagonal_sq + eps)


def pairwise_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU matrix of xyxy boxes ``(N, 4)`` × ``(M, 4)`` → ``(N, M)``."""
    return box_iou(boxes1[:, None, :], boxes2[None, :, :], eps)
