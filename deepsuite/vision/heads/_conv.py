"""The 3×3 conv → ReLU → 1×1 conv branch shared by the dense prediction heads."""

from __future__ import annotations

from torch import nn


def conv_branch(in_channels: int, out_channels: int, head_conv: int) -> nn.Sequential:
    """``3×3 conv(in, head_conv) → ReLU → 1×1 conv(head_conv, out)``; a single 1×1 conv if head_conv ≤ 0."""
    if head_conv <= 0:
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1))
    return nn.Sequential(
        nn.Conv2d(in_channels, head_conv, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(head_conv, out_channels, kernel_size=1),
    )
