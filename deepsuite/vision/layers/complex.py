"""Complex-valued convolution and batch normalisation (Trabelsi et al., "Deep Complex Networks", 2018).

Both layers take either a native complex tensor (``torch.complex64``/``complex128``) or a real
tensor whose last dimension holds (real, imag) — ``(B, C, H, W, 2)``, the seed's layout — and
return the same layout they were given. Internally everything is computed on the real and
imaginary parts with real convolutions, so both layouts share weights and results.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def split_complex(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(real, imag, is_native_complex)`` of a complex tensor or a real ``(..., 2)`` tensor."""
    if x.is_complex():
        return x.real, x.imag, True
    if x.shape[-1] != 2:
        raise ValueError(
            f"expected a complex tensor or a real tensor with (real, imag) in a last dimension of size 2, "
            f"got {x.dtype} of shape {tuple(x.shape)}"
        )
    return x[..., 0], x[..., 1], False


def merge_complex(real: torch.Tensor, imag: torch.Tensor, native: bool) -> torch.Tensor:
    """Inverse of `split_complex`: a complex tensor if ``native`` else ``stack((real, imag), -1)``."""
    return torch.complex(real, imag) if native else torch.stack((real, imag), dim=-1)


class ComplexConv2d(nn.Module):
    """Complex 2-D convolution ``W * z + b`` with ``W = A + iB``: ``(A*x − B*y) + i(B*x + A*y)``.

    Arguments as ``nn.Conv2d``. ``A`` and ``B`` start with ``nn.Conv2d``'s init scaled by ``1/√2``
    (so the complex weight has the variance of a real conv's); the complex bias starts at 0.
    Input ``(B, C, H, W)`` complex or ``(B, C, H, W, 2)`` real; output in the same layout.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        conv_args = (in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.conv_real = nn.Conv2d(*conv_args, bias=False)  # A
        self.conv_imag = nn.Conv2d(*conv_args, bias=False)  # B
        self.bias = nn.Parameter(torch.zeros(out_channels, 2)) if bias else None
        with torch.no_grad():
            self.conv_real.weight.mul_(1 / math.sqrt(2))
            self.conv_imag.weight.mul_(1 / math.sqrt(2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Complex convolution of ``z`` (see the class docstring)."""
        x, y, native = split_complex(z)
        if x.dim() != 4:
            raise ValueError(
                f"expected batched (B, C, H, W) complex values, got real/imag parts of shape {tuple(x.shape)}"
            )
        both = torch.cat((x, y), dim=0)  # (2B, C, H, W): one conv call per real weight
        a_xy, b_xy = self.conv_real(both).chunk(2, dim=0), self.conv_imag(both).chunk(2, dim=0)
        real = a_xy[0] - b_xy[1]  # A*x − B*y
        imag = b_xy[0] + a_xy[1]  # B*x + A*y
        if self.bias is not None:
            real = real + self.bias[:, 0, None, None]
            imag = imag + self.bias[:, 1, None, None]
        return merge_complex(real, imag, native)

    @property
    def complex_weight(self) -> torch.Tensor:
        """``A + iB`` as a complex tensor (for checks and export)."""
        return torch.complex(self.conv_real.weight, self.conv_imag.weight)


class ComplexBatchNorm2d(nn.Module):
    """Complex batch normalisation by 2×2 covariance whitening (Trabelsi et al. 2018, §3.5).

    Per channel, with ``x, y`` the centred real and imaginary parts and ``V = [[Vrr, Vri], [Vri, Vii]]``
    their covariance (+ eps on the diagonal), ``z̃ = V^{-1/2} (x, y)`` (closed-form inverse square root
    of a 2×2 SPD matrix), then ``out = Γ z̃ + β`` with a symmetric ``Γ = [[γrr, γri], [γri, γii]]``
    (init ``γrr = γii = 1/√2, γri = 0``, so ``E|out|² = 1``) and a complex ``β`` (init 0).

    Training uses the batch statistics (over B, H, W) and updates ``running_mean`` ``(C, 2)`` and
    ``running_covar`` ``(C, 3)`` = (Vrr, Vii, Vri), init (1, 1, 0), by
    ``running ← (1 − momentum)·running + momentum·batch`` with the unbiased batch covariance, as
    ``nn.BatchNorm2d``. Evaluation uses the running statistics. Input ``(B, C, H, W)`` complex or
    ``(B, C, H, W, 2)`` real; output in the same layout.
    """

    running_mean: torch.Tensor
    running_covar: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, 3))  # (γrr, γii, γri)
            self.bias = nn.Parameter(torch.empty(num_features, 2))  # (βr, βi)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, 2))
            self.register_buffer("running_covar", torch.zeros(num_features, 3))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running covariance the identity."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_covar.zero_()
            self.running_covar[:, :2] = 1.0
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Running statistics and ``Γ = I/√2``, ``β = 0``."""
        self.reset_running_stats()
        if self.affine:
            with torch.no_grad():
                self.weight.zero_()
                self.weight[:, :2] = 1 / math.sqrt(2)
                self.bias.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Whitened, scaled and shifted ``z`` (see the class docstring)."""
        x, y, native = split_complex(z)
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(
                f"expected (B, {self.num_features}, H, W) complex values, got real/imag parts of shape {tuple(x.shape)}"
            )
        use_batch_stats = self.training or not self.track_running_stats
        shape = (1, -1, 1, 1)
        if use_batch_stats:
            dims = (0, 2, 3)
            mean_r, mean_i = x.mean(dims), y.mean(dims)
            xc, yc = x - mean_r.view(shape), y - mean_i.view(shape)
            vrr, vii, vri = (xc * xc).mean(dims), (yc * yc).mean(dims), (xc * yc).mean(dims)
            if self.training and self.track_running_stats:
                n = x.numel() // x.shape[1]
                unbiased = n / max(n - 1, 1)
                with torch.no_grad():
                    batch_mean = torch.stack((mean_r, mean_i), dim=-1)
                    batch_covar = torch.stack((vrr, vii, vri), dim=-1) * unbiased
                    self.running_mean.lerp_(batch_mean.to(self.running_mean.dtype), self.momentum)
                    self.running_covar.lerp_(batch_covar.to(self.running_covar.dtype), self.momentum)
                    self.num_batches_tracked.add_(1)
        else:
            mean_r, mean_i = self.running_mean[:, 0].to(x.dtype), self.running_mean[:, 1].to(x.dtype)
            xc, yc = x - mean_r.view(shape), y - mean_i.view(shape)
            vrr, vii, vri = (self.running_covar[:, i].to(x.dtype) for i in range(3))
        vrr, vii = vrr + self.eps, vii + self.eps

        # inverse square root of [[vrr, vri], [vri, vii]]: (V + sI)/(s·t), s = √det, t = √(tr + 2s)
        s = torch.sqrt(vrr * vii - vri * vri)
        t = torch.sqrt(vrr + vii + 2 * s)
        inv_st = 1.0 / (s * t)
        wrr, wii, wri = (
            ((vii + s) * inv_st).view(shape),
            ((vrr + s) * inv_st).view(shape),
            (-vri * inv_st).view(shape),
        )
        xw = wrr * xc + wri * yc
        yw = wri * xc + wii * yc
        if self.affine:
            grr, gii, gri = (self.weight[:, i].view(shape) for i in range(3))
            xw, yw = (
                grr * xw + gri * yw + self.bias[:, 0].view(shape),
                gri * xw + gii * yw + self.bias[:, 1].view(shape),
            )
        return merge_complex(xw, yw, native)
