"""ResNet bottleneck block, v1.5 (the stride sits on the 3×3 conv, as torchvision's ResNet-50)."""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    """``1×1 conv → BN → ReLU → 3×3 conv (stride) → BN → ReLU → 1×1 conv (×4) → BN``, plus shortcut, ReLU.

    Output channels are ``channels · expansion`` (expansion 4). Module names follow torchvision's
    ``Bottleneck`` (``conv1``… ``bn3``, ``downsample``) so its state dicts load unchanged.

    Args:
        in_channels: input channels.
        channels: bottleneck width before ``base_width``/``groups`` scaling (64, 128, … in ResNet-50).
        stride: stride of the 3×3 conv (and of the projection shortcut).
        downsample: the shortcut module. ``None`` builds the standard projection (1×1 conv with
            ``stride`` + BN) when the shape changes and uses the identity otherwise; pass
            any module to override it.
        groups, base_width: ResNeXt / wide-ResNet width ``int(channels · base_width / 64) · groups``.
        dilation: dilation (and padding) of the 3×3 conv.
        zero_init_residual: start ``bn3`` at γ = 0 so the block begins as its shortcut (Goyal et al.).
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        width = int(channels * (base_width / 64.0)) * groups
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(
            width, width, 3, stride=stride, padding=dilation, groups=groups, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        if downsample is None and (stride != 1 or in_channels != out_channels):
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.downsample = downsample
        self.stride = stride
        if zero_init_residual:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W) → (B, 4·channels, H/stride, W/stride)``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)
