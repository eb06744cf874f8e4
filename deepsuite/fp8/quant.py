"""Quantise to and from FP8 (``float8_e4m3fn`` / ``float8_e5m2``) with amax-based scales.

One code path covers every granularity: a 2-D tensor is cut into ``block = (rows, cols)`` tiles
and each tile gets one scale from its absolute maximum. ``-1`` in a block means "the whole
dimension", so

* ``TENSORWISE = (-1, -1)``: one scale for the tensor (Transformer Engine's current scaling);
* ``ROWWISE = (1, -1)``: one scale per row (``torch._scaled_mm`` rowwise);
* ``COLWISE = (-1, 1)``: one scale per column (the other operand of a rowwise matmul);
* ``TILE_1x128 = (1, 128)``: DeepSeek-V3's activation tiles, ``BLOCK_128x128``: its weight blocks.

Convention (the same as Transformer Engine's ``scale``): ``data = saturate(x * scale)`` and
``x ≈ data / scale``; ``scale = fp8_max / amax / 2**margin``, optionally rounded *down* to a power
of two so that the scaled values still fit (DeepSeek-V3). ``torch._scaled_mm`` wants the inverse,
``1 / scale``. Shapes that do not divide by the block are handled by padding with zeros for the
amax only (a zero never raises a maximum); ``data`` keeps the source shape and the partial tiles at
the edges get their own scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TENSORWISE: tuple[int, int] = (-1, -1)
ROWWISE: tuple[int, int] = (1, -1)
COLWISE: tuple[int, int] = (-1, 1)
TILE_1x128: tuple[int, int] = (1, 128)
TILE_128x1: tuple[int, int] = (128, 1)
BLOCK_128x128: tuple[int, int] = (128, 128)

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_DTYPES = (E4M3, E5M2)

# Smallest amax used to build a scale: an all-zero tile gets a finite (huge but harmless) scale.
_AMAX_EPS = 1e-12


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 format (448 for e4m3fn, 57344 for e5m2)."""
    _check_fp8_dtype(dtype)
    return float(torch.finfo(dtype).max)


def _check_fp8_dtype(dtype: torch.dtype) -> None:
    if dtype not in FP8_DTYPES:
        raise ValueError(f"FP8 dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")


@dataclass
class Float8Quantized:
    """An FP8 tensor with its scales.

    ``data`` (fp8, shape ``(M, K)``) ≈ ``x * scale`` tile by tile; ``scale`` is float32 of shape
    ``(ceil(M / block[0]), ceil(K / block[1]))`` where ``block`` is the resolved tile size (no -1).
    """

    data: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]

    @property
    def shape(self) -> torch.Size:
        """Shape of the quantised tensor."""
        return self.data.shape

    def expanded_scale(self) -> torch.Tensor:
        """The scale broadcast to one value per element, shape ``data.shape``."""
        rows, cols = self.data.shape
        s = self.scale.repeat_interleave(self.block[0], dim=0)[:rows]
        return s.repeat_interleave(self.block[1], dim=1)[:, :cols]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Back to high precision: ``data / scale`` in ``dtype``."""
        return (self.data.to(torch.float32) / self.expanded_scale()).to(dtype)

    def t(self) -> Float8Quantized:
        """The transpose (data, scales and tile shape transposed; a view of ``data``)."""
        return Float8Quantized(self.data.t(), self.scale.t(), (self.block[1], self.block[0]))


def resolve_block(block: tuple[int, int], shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """Replace -1 in ``block`` by the matching dimension of the 2-D ``shape``."""
    if len(shape) != 2:
        raise ValueError(f"block quantisation works on 2-D tensors, got shape {tuple(shape)}")
    rows = shape[0] if block[0] == -1 else block[0]
    cols = shape[1] if block[1] == -1 else block[1]
    if rows <= 0 or cols <= 0:
        raise ValueError(f"block sizes must be positive or -1, got {block}")
    return max(rows, 1), max(cols, 1)


def block_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Absolute maximum of each ``block`` tile of the 2-D ``x`` in float32, shape ``(ceil(M/bm), ceil(K/bk))``."""
    bm, bk = resolve_block(block, x.shape)
    rows, cols = x.shape
    if (bm, bk) == (rows, cols):  # one pass, no |x| temporary
        return torch.linalg.vector_norm(x.detach(), ord=float("inf")).float().reshape(1, 1)
    a = x.detach().abs()
    if bm == 1 and bk == cols:
        return a.amax(dim=1, keepdim=True).float()  # (M, 1)
    if bm == rows and bk == 1:
        return a.amax(dim=0, keepdim=True).float()  # (1, K)
    pad_r, pad_c = -rows % bm, -cols % bk
    if pad_r or pad_c:
        a = torch.nn.functional.pad(a, (0, pad_c, 0, pad_r))  # zeros never raise an amax
    n_r, n_c = a.shape[0] // bm, a.shape[1] // bk
    return a.reshape(n_r, bm, n_c, bk).amax(dim=(1, 3)).float()  # (M/bm, K/bk)


def amax_to_scale(
    amax: torch.Tensor, dtype: torch.dtype, margin: int = 0, power_of_two: bool = False
) -> torch.Tensor:
    """``fp8_max / amax / 2**margin`` in float32; all-zero tiles get a finite scale.

    ``power_of_two`` rounds the scale down to ``2**floor(log2(scale))``: the scaled amax still fits
    and dequantisation only shifts exponents (exact).
    """
    scale = fp8_max(dtype) / amax.float().clamp(min=_AMAX_EPS) / (2.0**margin)
    if power_of_two:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return scale


def cast_to_fp8(x: torch.Tensor, scale_per_element: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``saturate(x * scale)`` as ``dtype``: values beyond the format's range are clamped to ±max
    (a plain ``.to(float8_e4m3fn)`` would turn them into NaN)."""
    m = fp8_max(dtype)
    # x * scale promotes to float32 (the scale is a float32 tensor with dims); clamp in place
    scaled = x * scale_per_element if scale_per_element.ndim else x.float() * scale_per_element
    if scaled.dtype != torch.float32:
        scaled = scaled.float()
    return scaled.clamp_(-m, m).to(dtype)


def quantize(
    x: torch.Tensor,
    block: tuple[int, int] = TENSORWISE,
    dtype: torch.dtype = E4M3,
    *,
    margin: int = 0,
    power_of_two: bool = False,
    amax: torch.Tensor | None = None,
) -> Float8Quantized:
    """Quantise the 2-D ``x`` to ``dtype`` with one scale per ``block`` tile.

    ``amax`` (shape of the scale grid) overrides the measured maximum, e.g. for delayed scaling
    from an amax history; values beyond it saturate at ±fp8_max.
    """
    _check_fp8_dtype(dtype)
    resolved = resolve_block(block, x.shape)
    if amax is None:
        amax = block_amax(x, resolved)
    scale = amax_to_scale(amax, dtype, margin=margin, power_of_two=power_of_two)
    rows, cols = x.shape
    if resolved == (rows, cols):
        data = cast_to_fp8(x, scale, dtype)
    else:
        per_element = scale.repeat_interleave(resolved[0], dim=0)[:rows]
        per_element = per_element.repeat_interleave(resolved[1], dim=1)[:, :cols]
        data = cast_to_fp8(x, per_element, dtype)
    return Float8Quantized(data, scale, resolved)


def dequantize(q: Float8Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q.data / q.scale`` in ``dtype`` (see `Float8Quantized.dequantize`)."""
    return q.dequantize(dtype)


def fake_quantize(
    x: torch.Tensor,
    block: tuple[int, int] = TENSORWISE,
    dtype: torch.dtype = E4M3,
    *,
    margin: int = 0,
    power_of_two: bool = False,
) -> torch.Tensor:
    """Round trip ``dequantize(quantize(x))`` in ``x.dtype``: the value an FP8 matmul really sees."""
    return quantize(x, block, dtype, margin=margin, power_of_two=power_of_two).dequantize(x.dtype)
