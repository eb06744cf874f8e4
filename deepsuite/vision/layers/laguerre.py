"""(Generalised) Laguerre polynomial feature expansion by the three-term recurrence."""

from __future__ import annotations

import torch
from torch import nn


def laguerre_polynomials(x: torch.Tensor, degree: int, alpha: float = 0.0) -> torch.Tensor:
    """``(L_0^α(x), …, L_degree^α(x))`` stacked in a new last dimension: ``(...) → (..., degree + 1)``.

    ``L_0 = 1``, ``L_1 = 1 + α − x``, ``L_{k+1} = ((2k + 1 + α − x)·L_k − (k + α)·L_{k−1}) / (k + 1)``;
    α = 0 gives the ordinary Laguerre polynomials of numpy.polynomial.laguerre
    (``L_2 = (x² − 4x + 2)/2``), orthogonal on [0, ∞) under ``x^α e^{−x}``.
    """
    if degree < 0:
        raise ValueError(f"degree={degree} must be >= 0")
    if alpha <= -1:
        raise ValueError(f"alpha={alpha} must be > -1")
    polys = [torch.ones_like(x)]
    if degree >= 1:
        polys.append(1 + alpha - x)
    for k in range(1, degree):
        polys.append(((2 * k + 1 + alpha - x) * polys[k] - (k + alpha) * polys[k - 1]) / (k + 1))
    return torch.stack(polys, dim=-1)


class LaguerreFeatures(nn.Module):
    """Expand every input value into its Laguerre polynomials of degree 0…``degree``.

    Args:
        degree: highest degree n (n + 1 features per value).
        alpha: generalisation parameter α > −1 (0: ordinary Laguerre).
        flatten: ``(..., F) → (..., F·(n + 1))`` instead of ``(..., F, n + 1)``.
    """

    def __init__(self, degree: int, alpha: float = 0.0, flatten: bool = False) -> None:
        super().__init__()
        laguerre_polynomials(torch.zeros(1), degree, alpha)  # validates the arguments
        self.degree = degree
        self.alpha = alpha
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Polynomial features of ``x`` (see the class docstring)."""
        features = laguerre_polynomials(x, self.degree, self.alpha)
        return features.flatten(-2) if self.flatten and x.dim() > 0 else features

    def extra_repr(self) -> str:
        return f"degree={self.degree}, alpha={self.alpha}, flatten={self.flatten}"
