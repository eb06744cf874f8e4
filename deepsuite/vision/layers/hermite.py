"""Hermite polynomial feature expansion by the three-term recurrence."""

from __future__ import annotations

import torch
from torch import nn

HERMITE_KINDS = ("physicists", "probabilists")


def hermite_polynomials(x: torch.Tensor, degree: int, kind: str = "physicists") -> torch.Tensor:
    """``(H_0(x), …, H_degree(x))`` stacked in a new last dimension: ``(...) → (..., degree + 1)``.

    - ``"physicists"`` (``H``, numpy.polynomial.hermite): ``H_0 = 1, H_1 = 2x,
      H_{k+1} = 2x·H_k − 2k·H_{k−1}`` (``H_3 = 8x³ − 12x``), orthogonal under ``exp(−x²)``.
    - ``"probabilists"`` (``He``, numpy.polynomial.hermite_e): ``He_0 = 1, He_1 = x,
      He_{k+1} = x·He_k − k·He_{k−1}`` (``He_3 = x³ − 3x``), orthogonal under ``exp(−x²/2)``.
    """
    if kind not in HERMITE_KINDS:
        raise ValueError(f"kind={kind!r} is not supported; use one of {HERMITE_KINDS}")
    if degree < 0:
        raise ValueError(f"degree={degree} must be >= 0")
    scale = 2.0 if kind == "physicists" else 1.0
    polys = [torch.ones_like(x)]
    if degree >= 1:
        polys.append(scale * x)
    for k in range(1, degree):
        polys.append(scale * (x * polys[k] - k * polys[k - 1]))
    return torch.stack(polys, dim=-1)


class HermiteFeatures(nn.Module):
    """Expand every input value into its Hermite polynomials of degree 0…``degree``.

    Args:
        degree: highest degree n (n + 1 features per value).
        kind: ``"physicists"`` (H, default) or ``"probabilists"`` (He); see `hermite_polynomials`.
        flatten: merge the feature dimension into the last input dimension,
            ``(..., F) → (..., F·(n + 1))``; otherwise ``(..., F) → (..., F, n + 1)``.
    """

    def __init__(self, degree: int, kind: str = "physicists", flatten: bool = False) -> None:
        super().__init__()
        hermite_polynomials(torch.zeros(1), degree, kind)  # validates the arguments
        self.degree = degree
        self.kind = kind
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Polynomial features of ``x`` (see the class docstring)."""
        features = hermite_polynomials(x, self.degree, self.kind)
        return features.flatten(-2) if self.flatten and x.dim() > 0 else features

    def extra_repr(self) -> str:
        return f"degree={self.degree}, kind={self.kind!r}, flatten={self.flatten}"
