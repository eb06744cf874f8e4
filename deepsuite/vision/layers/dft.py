"""Differentiable discrete Fourier transform as a matrix product.

``X[k] = Σ_j x[j]·exp(∓2πi·jk/n)`` (minus sign forward, plus inverse) along one or more dimensions,
with ``torch.fft``'s ``norm`` conventions: ``"backward"`` (1 forward, 1/n inverse), ``"ortho"``
(1/√n both ways), ``"forward"`` (1/n forward, 1 inverse). Results equal ``torch.fft.fft``/``ifft``/
``fftn``/``ifftn``; gradients flow through the matrix product. Costs O(n²) per transformed
dimension instead of O(n log n): meant for short transforms and for places where an explicit,
inspectable (or later learnable) transform matrix is wanted.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NORMS = ("backward", "ortho", "forward")


def dft_matrix(
    n: int,
    inverse: bool = False,
    norm: str = "backward",
    dtype: torch.dtype = torch.complex128,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The ``(n, n)`` DFT matrix ``W[k, j] = scale · exp(∓2πi·jk/n)``.

    The phase uses ``(j·k) mod n`` in float64, so large indices lose no precision.
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not supported; use one of {NORMS}")
    index = torch.arange(n, dtype=torch.int64, device=device)
    phase = (index[:, None] * index[None, :]) % n
    angle = (2 * math.pi / n) * phase.to(torch.float64) * (1.0 if inverse else -1.0)
    if norm == "ortho":
        scale = 1 / math.sqrt(n)
    elif (norm == "backward") == inverse:  # backward-inverse or forward-forward
        scale = 1 / n
    else:
        scale = 1.0
    return torch.polar(torch.full_like(angle, scale), angle).to(dtype)


def _complex_dtype(x: torch.Tensor) -> torch.dtype:
    if x.is_complex():
        return x.dtype
    return torch.complex128 if x.dtype == torch.float64 else torch.complex64


def dft(
    x: torch.Tensor, dim: int | tuple[int, ...] = -1, inverse: bool = False, norm: str = "backward"
) -> torch.Tensor:
    """Matrix DFT of a real or complex ``x`` along ``dim`` (one or several); returns a complex tensor."""
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    out = x.to(_complex_dtype(x))
    for d in dims:
        w = dft_matrix(out.shape[d], inverse, norm, out.dtype, out.device)
        out = (out.movedim(d, -1) @ w.T).movedim(-1, d)
    return out


class DFT(nn.Module):
    """`dft` as a module over fixed sizes.

    Args:
        n: transform length, or one length per dimension in ``dim``; inputs must match.
        dim: dimension(s) to transform (default the last).
        inverse: the inverse transform (``ifft``) instead of the forward one.
        norm: ``"backward"`` | ``"ortho"`` | ``"forward"`` as ``torch.fft``.

    ``forward(x)``: real or complex ``x`` → complex tensor of the same shape. The matrices are
    built in float64 once per (device, dtype) and cached.
    """

    def __init__(
        self,
        n: int | tuple[int, ...],
        dim: int | tuple[int, ...] = -1,
        inverse: bool = False,
        norm: str = "backward",
    ) -> None:
        super().__init__()
        self.n = (n,) if isinstance(n, int) else tuple(n)
        self.dim = (dim,) if isinstance(dim, int) else tuple(dim)
        if len(self.n) != len(self.dim):
            raise ValueError(f"n={n} and dim={dim} must name the same number of dimensions")
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r} is not supported; use one of {NORMS}")
        self.inverse = inverse
        self.norm = norm
        self._matrices: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    def _matrix(self, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (n, device, dtype)
        if key not in self._matrices:
            self._matrices[key] = dft_matrix(n, self.inverse, self.norm, dtype, device)
        return self._matrices[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Complex transform of ``x`` along ``dim``."""
        out = x.to(_complex_dtype(x))
        for n, d in zip(self.n, self.dim):
            if out.shape[d] != n:
                raise ValueError(
                    f"DFT built for length {n} along dim {d}, got input of shape {tuple(x.shape)}"
                )
            out = (out.movedim(d, -1) @ self._matrix(n, out.device, out.dtype).T).movedim(-1, d)
        return out

    def extra_repr(self) -> str:
        return f"n={self.n}, dim={self.dim}, inverse={self.inverse}, norm={self.norm!r}"
