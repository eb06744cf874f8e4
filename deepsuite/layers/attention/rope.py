"""Rotary position embedding with YaRN, in DeepSeek's interleaved-pair convention.

DeepSeek rotates pairs ``(x0, x1), (x2, x3), …`` of the rope slice, pair ``i`` by angle
``pos · inv_freq[i]``. The rotated result is written de-interleaved (real parts then imaginary
parts), exactly as transformers' ``apply_rotary_pos_emb_interleave`` (``rope_interleave=True``);
queries and keys get the same permutation, so their dot products equal DeepSeek's.

YaRN (arXiv 2309.00071) follows transformers' ``_compute_yarn_parameters``: per-dimension blend of
interpolated and extrapolated frequencies over a linear ramp between the correction dimensions of
``beta_fast`` and ``beta_slow`` (rounded outwards), and an attention factor
``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` on cos/sin.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """``0.1 · mscale · ln(factor) + 1`` (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(
    dim: int,
    base: float,
    factor: float,
    original_max_seq_len: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> torch.Tensor:
    """YaRN inverse frequencies ``(dim // 2,)`` in float32, bit-identical to transformers'."""

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original_max_seq_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = float(max(math.floor(correction_dim(beta_fast)), 0))
    high = float(min(math.ceil(correction_dim(beta_slow)), dim - 1))
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` ``(..., T, D)`` by ``cos``/``sin`` ``(T, D/2)``.

    Returns ``[x_even·cos − x_odd·sin, x_odd·cos + x_even·sin]`` concatenated on the last dim
    (transformers' interleave layout). ``cos``/``sin`` are cast to ``x.dtype`` first, as in
    transformers.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class RotaryPositionEmbedding(nn.Module):
    """Precomputed cos/sin tables ``(max_seq_len, dim/2)`` (float32, non-persistent buffers).

    Args:
        dim: rotated dimensions per head (DeepSeek: ``qk_rope_head_dim``).
        max_seq_len: positions tabulated.
        base: RoPE theta.
        scaling: ``"none"`` or ``"yarn"``.
        factor, original_max_seq_len, beta_fast, beta_slow, mscale, mscale_all_dim: YaRN parameters.

    ``rope(q, k, start_pos=0)`` rotates queries and keys ``(B, H, T, dim)`` at positions
    ``start_pos + t``; ``cos_sin(start_pos, T)`` gives the tables for `apply_rotary`.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(
        self,
        dim: int,
        max_seq_len: int,
        base: float = 10000.0,
        scaling: str = "none",
        factor: float = 1.0,
        original_max_seq_len: int = 4096,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        mscale: float = 1.0,
        mscale_all_dim: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"RoPE dim={dim} must be even")
        if scaling not in ("none", "yarn"):
            raise ValueError(f"RoPE scaling={scaling!r} must be 'none' or 'yarn'")
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.base = base
        self.scaling = scaling
        self.factor = factor
        self.original_max_seq_len = original_max_seq_len
        self.beta_fast = beta_fast
        self.beta_slow = beta_slow
        self.mscale = mscale
        self.mscale_all_dim = mscale_all_dim
        self.register_buffer("cos", torch.empty(max_seq_len, dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, dim // 2), persistent=False)
        self.init_weights()

    @property
    def attention_factor(self) -> float:
        """Factor on cos/sin: YaRN's ``mscale(f, mscale) / mscale(f, mscale_all_dim)``; 1 without YaRN."""
        if self.scaling != "yarn":
            return 1.0
        if self.mscale and self.mscale_all_dim:
            return yarn_get_mscale(self.factor, self.mscale) / yarn_get_mscale(
                self.factor, self.mscale_all_dim
            )
        return yarn_get_mscale(self.factor)

    def inv_freq(self) -> torch.Tensor:
        """Inverse frequencies ``(dim // 2,)`` in float32 (on CPU)."""
        if self.scaling == "yarn":
            return yarn_inv_freq(
                self.dim, self.base, self.factor, self.original_max_seq_len, self.beta_fast, self.beta_slow
            )
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float) / self.dim))

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)compute the cos/sin tables (after ``to_empty`` from the meta device)."""
        if self.cos.device.type == "meta":
            return
        device = self.cos.device
        with torch.device("cpu"):
            inv_freq = self.inv_freq()
            pos = torch.arange(self.max_seq_len, dtype=torch.float32)
            freqs = pos[:, None] * inv_freq[None, :]  # (T, dim/2), as transformers: position * inv_freq
            scale = self.attention_factor
        self.cos.copy_((freqs.cos() * scale).to(device))
        self.sin.copy_((freqs.sin() * scale).to(device))

    def cos_sin(self, start_pos: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``(T, dim/2)`` for positions ``start_pos … start_pos + T - 1``."""
        end = start_pos + seq_len
        if start_pos < 0 or end > self.max_seq_len:
            raise ValueError(
                f"positions {start_pos}..{end - 1} are outside the RoPE table of max_seq_len={self.max_seq_len}"
            )
        return self.cos[start_pos:end], self.sin[start_pos:end]

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, start_pos: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` and ``k`` ``(..., T, dim)`` at positions ``start_pos + t``."""
        cos, sin = self.cos_sin(start_pos, q.shape[-2])
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_seq_len={self.max_seq_len}, base={self.base}, scaling={self.scaling}"
