"""Keypoint heatmap head with sub-pixel decoding.

One heatmap per keypoint; the keypoint is where its map peaks. Grid cell (i, j) stands for the
point ``(j·stride, i·stride)`` in input pixels (the convention of the CenterNet targets). Decoding:

- ``"quadratic"`` (default): the integer argmax is refined by fitting a parabola through the
  *log* heatmap at the argmax and its two neighbours along each axis,
  ``δ = ½ (L₋ − L₊) / (L₋ − 2L₀ + L₊)``, clamped to [−½, ½] (the Taylor step of DARK, Zhang et
  al. 2020, per axis). The log of a Gaussian is a parabola, so a Gaussian heatmap gives its exact
  sub-pixel centre. No refinement on the border or where the log map is not concave.
- ``"soft_argmax"``: the expectation of the coordinates under ``softmax(β·heatmap)`` over the whole
  map (integral regression, Sun et al. 2018); differentiable, for training on coordinates.
- ``"none"``: the integer argmax.
"""

from __future__ import annotations

import torch
from torch import nn

from deepsuite.vision.heads._conv import conv_branch

REFINEMENTS = ("quadratic", "soft_argmax", "none")


def _quadratic_offset(left: torch.Tensor, centre: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    curvature = left - 2 * centre + right
    concave = curvature < 0
    safe = torch.where(concave, curvature, -torch.ones_like(curvature))
    offset = 0.5 * (left - right) / safe
    return torch.where(concave, offset.clamp(-0.5, 0.5), torch.zeros_like(offset))


class HeatmapHead(nn.Module):
    """A conv branch producing ``(B, num_keypoints, H, W)`` heatmaps (no activation), and ``decode``.

    Args:
        in_channels: feature channels.
        num_keypoints: heatmap channels K.
        head_conv: hidden channels of the 3×3 conv (≤ 0: a single 1×1 conv).
    """

    def __init__(self, in_channels: int, num_keypoints: int, head_conv: int = 64) -> None:
        super().__init__()
        self.heatmap = conv_branch(in_channels, num_keypoints, head_conv)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Raw heatmaps ``(B, K, H, W)``."""
        return self.heatmap(features)

    @staticmethod
    def decode(
        heatmaps: torch.Tensor,
        stride: float = 1.0,
        refine: str = "quadratic",
        apply_sigmoid: bool = False,
        beta: float = 1.0,
        eps: float = 1e-10,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keypoint coordinates and scores from ``(B, K, H, W)`` heatmaps.

        Args:
            heatmaps: the maps (scores, or logits with ``apply_sigmoid=True``).
            stride: input pixels per heatmap cell.
            refine: ``"quadratic"`` | ``"soft_argmax"`` | ``"none"`` (see the module docstring).
            apply_sigmoid: apply a sigmoid to the maps first.
            beta: softmax sharpness for ``"soft_argmax"``.
            eps: floor of the scores before the log in ``"quadratic"``.

        Returns:
            ``coords (B, K, 2)`` as (x, y) in input pixels and ``scores (B, K)`` (the map maximum).
        """
        if refine not in REFINEMENTS:
            raise ValueError(f"refine={refine!r} is not supported; use one of {REFINEMENTS}")
        if apply_sigmoid:
            heatmaps = heatmaps.sigmoid()
        b, k, h, w = heatmaps.shape
        flat = heatmaps.reshape(b, k, h * w)
        scores, index = flat.max(dim=-1)  # (B, K)

        if refine == "soft_argmax":
            weights = torch.softmax(beta * flat, dim=-1).reshape(b, k, h, w)
            xs = torch.arange(w, dtype=weights.dtype, device=weights.device)
            ys = torch.arange(h, dtype=weights.dtype, device=weights.device)
            x = (weights.sum(dim=2) * xs).sum(-1)  # (B, K)
            y = (weights.sum(dim=3) * ys).sum(-1)
            return torch.stack((x, y), dim=-1) * stride, scores

        y_int = torch.div(index, w, rounding_mode="floor")
        x_int = index % w
        x = x_int.to(heatmaps.dtype)
        y = y_int.to(heatmaps.dtype)
        if refine == "quadratic":
            log_map = heatmaps.clamp(min=eps).log().reshape(b, k, h * w)

            def value_at(dy: int, dx: int) -> torch.Tensor:
                yy = (y_int + dy).clamp(0, h - 1)
                xx = (x_int + dx).clamp(0, w - 1)
                return log_map.gather(-1, (yy * w + xx)[..., None])[..., 0]

            centre = value_at(0, 0)
            inside_x = (x_int > 0) & (x_int < w - 1)
            inside_y = (y_int > 0) & (y_int < h - 1)
            dx = _quadratic_offset(value_at(0, -1), centre, value_at(0, 1))
            dy = _quadratic_offset(value_at(-1, 0), centre, value_at(1, 0))
            x = x + torch.where(inside_x, dx, torch.zeros_like(dx))
            y = y + torch.where(inside_y, dy, torch.zeros_like(dy))
        return torch.stack((x, y), dim=-1) * stride, scores
