"""CenterNet head (Zhou et al., "Objects as Points", 2019): class heatmaps, box sizes, centre offsets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepsuite.vision.heads._conv import conv_branch

# bias of the heatmap logits at init: sigmoid(−2.19) ≈ 0.1, the focal-loss prior of Lin et al.
HEATMAP_PRIOR_BIAS = -2.19


def heatmap_peaks(
    heatmap: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` local maxima of ``(B, C, H, W)`` scores (≥ 0, e.g. sigmoid outputs) over classes and positions.

    A position is a peak when it equals the max of its 3×3 neighbourhood (CenterNet's NMS-free
    extraction); other positions count as 0. Returns ``scores, classes, ys, xs``, each ``(B, k)``
    (k clipped to C·H·W), sorted by score.
    """
    b, c, h, w = heatmap.shape
    neighbourhood_max = F.max_pool2d(heatmap, kernel_size=3, stride=1, padding=1)
    peaks = torch.where(neighbourhood_max == heatmap, heatmap, torch.zeros_like(heatmap))
    scores, flat = peaks.reshape(b, -1).topk(min(k, c * h * w), dim=1)  # (B, k)
    classes = torch.div(flat, h * w, rounding_mode="floor")
    spatial = flat % (h * w)
    return scores, classes, torch.div(spatial, w, rounding_mode="floor"), spatial % w


class CenterNetHead(nn.Module):
    """Three conv branches on ``(B, in_channels, H, W)`` features.

    ``forward`` returns ``{"heatmap": (B, num_classes, H, W) logits, "wh": (B, 2, H, W),
    "reg": (B, 2, H, W)}``. The heatmap is returned as *logits* (no sigmoid): `CenterNetLoss` takes
    logits for a stable log-sigmoid and ``decode`` applies the sigmoid. ``wh`` is the box size in
    output cells and ``reg`` the centre offset within its cell.

    Args:
        in_channels: feature channels.
        num_classes: heatmap channels.
        head_conv: hidden channels of each branch's 3×3 conv (≤ 0: a single 1×1 conv).
    """

    def __init__(self, in_channels: int, num_classes: int, head_conv: int = 64) -> None:
        super().__init__()
        self.heatmap = conv_branch(in_channels, num_classes, head_conv)
        self.wh = conv_branch(in_channels, 2, head_conv)
        self.reg = conv_branch(in_channels, 2, head_conv)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default conv init, then the heatmap bias at −2.19 (initial scores ≈ 0.1)."""
        for branch in (self.heatmap, self.wh, self.reg):
            for layer in branch:
                if isinstance(layer, nn.Conv2d):
                    layer.reset_parameters()
        last = self.heatmap[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        nn.init.constant_(last.bias, HEATMAP_PRIOR_BIAS)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Heatmap logits, sizes and offsets (see the class docstring)."""
        return {"heatmap": self.heatmap(features), "wh": self.wh(features), "reg": self.reg(features)}

    @staticmethod
    def decode(
        outputs: dict[str, torch.Tensor], k: int = 100, stride: float = 4.0, apply_sigmoid: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-``k`` detections per image.

        Peaks come from `heatmap_peaks` (3×3 max-pool); a peak at cell (x, y) with offset (ox, oy)
        and size (w, h) gives the box centred at ``((x + ox)·stride, (y + oy)·stride)`` of size
        ``(w·stride, h·stride)``, the inverse of `build_centernet_targets`.

        Args:
            outputs: ``forward``'s dict (or targets laid out the same way).
            k: detections per image.
            stride: input pixels per output cell.
            apply_sigmoid: the heatmap holds logits (True, ``forward``'s output) or scores in [0, 1].

        Returns:
            ``boxes (B, k, 4)`` xyxy in input pixels, ``scores (B, k)``, ``classes (B, k)`` long.
        """
        heat = outputs["heatmap"]
        if apply_sigmoid:
            heat = heat.sigmoid()
        scores, classes, ys, xs = heatmap_peaks(heat, k)
        spatial = ys * heat.shape[-1] + xs  # (B, k)

        def at_peaks(name: str) -> torch.Tensor:
            feature = outputs[name]  # (B, 2, H, W)
            flat = feature.flatten(2)  # (B, 2, HW)
            return flat.gather(2, spatial[:, None, :].expand(-1, 2, -1)).transpose(1, 2)  # (B, k, 2)

        wh, reg = at_peaks("wh"), at_peaks("reg")
        centre = torch.stack((xs, ys), dim=-1).to(reg.dtype) + reg  # (B, k, 2)
        boxes = torch.cat((centre - 0.5 * wh, centre + 0.5 * wh), dim=-1) * stride
        return boxes, scores, classes
