"""Normalisation layers."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm: ``x / sqrt(mean(x²) + eps) · weight``.

    Computed in float32 and cast back to the input dtype before the weight is applied, exactly as
    transformers' ``DeepseekV3RMSNorm`` / ``LlamaRMSNorm`` do, so bf16 results match bit for bit.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Weight to ones."""
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


@torch.no_grad()
def init_layer_norm(norm: nn.LayerNorm) -> None:
    """Weight to ones and bias (when present) to zeros."""
    if norm.weight is not None:
        nn.init.ones_(norm.weight)
    if norm.bias is not None:
        nn.init.zeros_(norm.bias)
