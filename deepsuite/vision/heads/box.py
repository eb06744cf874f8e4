"""Dense box regression head with (l, t, r, b) or (cx, cy, w, h) parametrisation.

Every cell of an output grid owns an anchor point (its centre in input pixels,
``((j + 0.5)·stride, (i + 0.5)·stride)`` for row i, column j). The head predicts four numbers per
cell, in units of ``stride``:

- ``"ltrb"`` (FCOS-style): distances from the anchor point to the left, top, right and bottom
  sides; made non-negative with softplus in ``forward``.
- ``"cxcywh"``: centre offset (dx, dy) from the anchor point (unconstrained) and width, height
  (softplus).

``decode`` turns them into xyxy boxes in input pixels, ready for `GIoULoss`/`DIoULoss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepsuite.vision.heads._conv import conv_branch

BOX_HEAD_FORMATS = ("ltrb", "cxcywh")


def anchor_points(height: int, width: int, stride: float, device: torch.device | None = None) -> torch.Tensor:
    """Cell centres of an ``(H, W)`` grid in input pixels, row-major ``(H·W, 2)`` as (x, y)."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1)


def ltrb_to_xyxy(distances: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(l, t, r, b) distances ``(..., 4)`` from ``points`` ``(..., 2)`` → xyxy boxes."""
    return torch.cat((points - distances[..., :2], points + distances[..., 2:]), dim=-1)


def xyxy_to_ltrb(boxes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Inverse of `ltrb_to_xyxy` (distances are negative where a point lies outside its box)."""
    return torch.cat((points - boxes[..., :2], boxes[..., 2:] - points), dim=-1)


class BoxHead(nn.Module):
    """Box regression on ``(B, C, H, W)`` features (or ``(N, C)`` vectors, one box each).

    Args:
        in_channels: feature channels C.
        box_format: ``"ltrb"`` or ``"cxcywh"`` (see the module docstring).
        head_conv: hidden channels of the 3×3 conv; ≤ 0 for a single 1×1 conv (a linear map).

    ``forward`` returns ``(B, 4, H, W)`` (or ``(N, 4)``) box parameters in stride units;
    ``decode(pred, stride, points=None)`` returns xyxy boxes in input pixels, ``(B, H·W, 4)`` in
    `anchor_points` order for maps, ``(N, 4)`` for vectors (then ``points`` ``(N, 2)`` is required).
    """

    def __init__(self, in_channels: int, box_format: str = "ltrb", head_conv: int = 64) -> None:
        super().__init__()
        if box_format not in BOX_HEAD_FORMATS:
            raise ValueError(f"box_format={box_format!r} is not supported; use one of {BOX_HEAD_FORMATS}")
        self.box_format = box_format
        self.regress = conv_branch(in_channels, 4, head_conv)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Box parameters in stride units: non-negative distances (ltrb) or (dx, dy, w ≥ 0, h ≥ 0)."""
        vectors = features.dim() == 2
        if vectors:
            features = features[:, :, None, None]  # (N, C, 1, 1)
        raw = self.regress(features)  # (B, 4, H, W)
        if self.box_format == "ltrb":
            params = F.softplus(raw)
        else:
            params = torch.cat((raw[:, :2], F.softplus(raw[:, 2:])), dim=1)
        return params[:, :, 0, 0] if vectors else params

    def decode(self, pred: torch.Tensor, stride: float, points: torch.Tensor | None = None) -> torch.Tensor:
        """xyxy boxes in input pixels from ``forward``'s output (see the class docstring)."""
        if pred.dim() == 4:
            h, w = pred.shape[-2:]
            pred = pred.flatten(2).transpose(1, 2)  # (B, HW, 4)
            if points is None:
                points = anchor_points(h, w, stride, pred.device).to(pred.dtype)
        elif points is None:
            raise ValueError(
                "decode of (N, 4) box parameters needs their anchor points (N, 2) in input pixels"
            )
        params = pred * stride
        if self.box_format == "ltrb":
            return ltrb_to_xyxy(params, points)
        centre = points + params[..., :2]
        half = 0.5 * params[..., 2:]
        return torch.cat((centre - half, centre + half), dim=-1)
