"""Native FP8 linear layers on ``torch._scaled_mm`` (no Transformer Engine needed).

`Float8Linear` is an ``nn.Linear`` whose weight stays in high precision (the fp32 or bf16 master)
and whose three matmuls run in FP8:

* forward  ``y  = x  @ Wᵀ``  — x and W quantised to e4m3;
* dgrad    ``dx = dy @ W``   — dy quantised to ``grad_dtype`` (e5m2 by default), W to e4m3;
* wgrad    ``dW = dyᵀ @ x``  — dy and x quantised along the token dimension.

Every operand is quantised along the dimension the matmul contracts, so each scale multiplies
whole dot products and can be applied by ``_scaled_mm`` after the FP8 product:

=========== ================================ =================================================
scaling     forward (x, W)                    backward
=========== ================================ =================================================
tensorwise  one scale each                    reuses the forward's FP8 x and W (transposed)
rowwise     per row of x, per row of W        re-quantises along the new contraction dimension
block       x in 1×128 tiles, W in 128×128    dy in 1×128 (dgrad) / 128×1 (wgrad) tiles, x in
            blocks (DeepSeek-V3)              128×1 tiles; W's 128×128 blocks are reused
=========== ================================ =================================================

``torch._scaled_mm`` takes the first operand row-major and the second column-major; on CUDA the
contraction dimension and the second operand's other dimension must be multiples of 16, so
operands are zero-padded there when needed (zeros add nothing to a dot product). Block scales:
CUDA builds of torch that accept 1×128 / 128×128 scale grids in ``_scaled_mm`` (Hopper, recent
cuBLAS) use them directly; everywhere else (CPU included) the block product is computed as a sum
over 128-wide K slices of rowwise-scaled ``_scaled_mm`` calls accumulated in fp32, which is
DeepSeek-V3's "promote to fp32 every 128 elements" scheme; on CUDA without block-scaled cuBLAS
the operands are dequantised to bf16 for one bf16 GEMM instead (faster than K/128 small GEMMs).
Whether the direct call is used is decided once per device by a probe that compares it with the
K-slice sum.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from deepsuite.fp8.quant import (
    E4M3,
    E5M2,
    ROWWISE,
    TENSORWISE,
    BLOCK_128x128,
    Float8Quantized,
    TILE_1x128,
    quantize,
)

logger = logging.getLogger(__name__)

Scaling = Literal["tensorwise", "rowwise", "block"]
SCALINGS: tuple[str, ...] = ("tensorwise", "rowwise", "block")
_CUDA_ALIGN = 16


@dataclass(frozen=True)
class Float8Recipe:
    """How a `Float8Linear` quantises: granularity, gradient format, scale options."""

    scaling: Scaling = "tensorwise"
    grad_dtype: torch.dtype = E5M2
    power_of_two_scales: bool = False
    margin: int = 0

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"Float8 scaling {self.scaling!r} is not one of {list(SCALINGS)}")
        if self.grad_dtype not in (E4M3, E5M2):
            raise ValueError(f"grad_dtype must be float8_e4m3fn or float8_e5m2, got {self.grad_dtype}")

    @property
    def activation_block(self) -> tuple[int, int]:
        """Tile of an operand quantised along its last (contraction) dimension: x, dy, xᵀ, dyᵀ."""
        return {"tensorwise": TENSORWISE, "rowwise": ROWWISE, "block": TILE_1x128}[self.scaling]

    @property
    def weight_block(self) -> tuple[int, int]:
        """Tile of the weight."""
        return {"tensorwise": TENSORWISE, "rowwise": ROWWISE, "block": BLOCK_128x128}[self.scaling]

    def quantize(self, x: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> Float8Quantized:
        """Quantise ``x`` (made contiguous) with this recipe's scale options."""
        return quantize(
            x.contiguous(), block, dtype, margin=self.margin, power_of_two=self.power_of_two_scales
        )


# --------------------------------------------------------------------------------------------
# scaled matmul of two quantised operands, both (rows, K) with K contiguous: a @ bᵀ
# --------------------------------------------------------------------------------------------


def _pad_fp8(q: Float8Quantized, rows_to: int, cols_to: int) -> Float8Quantized:
    """Zero-pad ``q.data`` to ``(rows_to, cols_to)``; the scale grid gains rows of ones where needed."""
    rows, cols = q.data.shape
    if (rows, cols) == (rows_to, cols_to):
        return q
    dtype = q.data.dtype
    data = F.pad(q.data.view(torch.uint8), (0, cols_to - cols, 0, rows_to - rows)).view(dtype)
    scale = q.scale
    n_rows = -(-rows_to // q.block[0])
    if q.block[0] != rows and n_rows > scale.shape[0]:  # per-row scales: new rows get scale 1
        scale = F.pad(scale, (0, 0, 0, n_rows - scale.shape[0]), value=1.0)
    block = (rows_to if q.block[0] == rows else q.block[0], cols_to if q.block[1] == cols else q.block[1])
    return Float8Quantized(data, scale, block)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _is_whole(q: Float8Quantized) -> bool:
    return tuple(q.block) == tuple(q.data.shape)


def _is_rowwise(q: Float8Quantized) -> bool:
    return q.block[0] == 1 and q.block[1] == q.data.shape[1]


def _row_scale_inv(q: Float8Quantized) -> torch.Tensor:
    """Dequantisation factors as a (rows, 1) column, from a tensorwise or rowwise operand."""
    inv = q.scale.reciprocal()
    if _is_whole(q):
        return inv.reshape(1, 1).expand(q.data.shape[0], 1).contiguous()
    return inv.reshape(-1, 1).contiguous()


def _mm_rowwise_or_tensorwise(
    a: Float8Quantized, b: Float8Quantized, out_dtype: torch.dtype, use_fast_accum: bool
) -> torch.Tensor:
    if a.data.is_cuda and _is_whole(a) and _is_whole(b):
        return torch._scaled_mm(
            a.data,
            b.data.t(),
            scale_a=a.scale.reciprocal().reshape(()),
            scale_b=b.scale.reciprocal().reshape(()),
            out_dtype=out_dtype,
            use_fast_accum=use_fast_accum,
        )
    # CUDA rowwise kernels output bf16. On CPU a tensorwise e4m3 × e4m3 product takes a path ~300×
    # slower than the rowwise one (torch 2.13), so CPU always runs rowwise with expanded scales,
    # in fp32 (also the fastest CPU output dtype).
    mm_dtype = torch.bfloat16 if a.data.is_cuda else torch.float32
    out = torch._scaled_mm(
        a.data,
        b.data.t(),
        scale_a=_row_scale_inv(a),  # (M, 1)
        scale_b=_row_scale_inv(b).t().contiguous(),  # (1, N)
        out_dtype=mm_dtype,
        use_fast_accum=use_fast_accum,
    )
    return out.to(out_dtype)


def _mm_block_kslices(a: Float8Quantized, b: Float8Quantized, out_dtype: torch.dtype) -> torch.Tensor:
    """Σ_j rowwise_scaled_mm(a[:, K_j], b[:, K_j]) over the 128-wide K slices, accumulated in fp32."""
    rows_a, k = a.data.shape
    rows_b = b.data.shape[0]
    bk = a.block[1]
    partial_dtype = torch.bfloat16 if a.data.is_cuda else torch.float32
    acc = torch.zeros(rows_a, rows_b, dtype=torch.float32, device=a.data.device)
    for j in range(a.scale.shape[1]):
        cols = slice(j * bk, min(k, (j + 1) * bk))
        inv_a = a.scale[:, j].reciprocal().repeat_interleave(a.block[0])[:rows_a]  # (M,)
        inv_b = b.scale[:, j].reciprocal().repeat_interleave(b.block[0])[:rows_b]  # (N,)
        acc += torch._scaled_mm(
            a.data[:, cols].contiguous(),
            b.data[:, cols].contiguous().t(),
            scale_a=inv_a[:, None].contiguous(),
            scale_b=inv_b[None, :].contiguous(),
            out_dtype=partial_dtype,
        ).float()
    return acc.to(out_dtype)


def _mm_block_dequantized(a: Float8Quantized, b: Float8Quantized, out_dtype: torch.dtype) -> torch.Tensor:
    """CUDA fallback without block-scaled cuBLAS: dequantise both operands to bf16 and use one bf16
    GEMM (fp32 accumulation). The values are exactly the FP8 ones times their scale, rounded to
    bf16's 8-bit mantissa (exact for power-of-two scales); one GEMM beats K/128 small FP8 GEMMs."""
    return (a.dequantize(torch.bfloat16) @ b.dequantize(torch.bfloat16).t()).to(out_dtype)


# Scale-grid layouts tried by the probe, most likely first (from torch's own blockwise samples:
# 1×128 scales of the first operand stored outer-dimension-major; 128×128 scales of the second as
# the transpose of a row-major (N/128, K/128 padded to a multiple of 4) grid).
_BLOCK_LAYOUTS: tuple[tuple[bool, bool], ...] = ((True, True), (True, False), (False, True), (False, False))


def _mm_block_direct(
    a: Float8Quantized, b: Float8Quantized, out_dtype: torch.dtype, layout: int
) -> torch.Tensor:
    """One ``_scaled_mm`` with block scale grids (Hopper + cuBLAS ≥ 12.9).

    ``scale_a`` is ``(M, K/128)`` for 1×128 tiles; ``scale_b`` is ``(K/128, N/128)`` for 128×128
    blocks or ``(K/128, N)`` for 1×128 tiles. ``layout`` picks the memory layout of the grids
    (`_BLOCK_LAYOUTS`): (first operand outer-dimension-major, second as a transposed padded grid).
    """
    a_outer_major, b_transposed = _BLOCK_LAYOUTS[layout]
    inv_a = a.scale.reciprocal()  # (M, K/128)
    inv_a = inv_a.t().contiguous().t() if a_outer_major else inv_a.contiguous()
    inv_b = b.scale.reciprocal()  # (N/bb, K/128)
    if b_transposed:
        k_blocks = inv_b.shape[1]
        if b.block[0] > 1:  # 128×128: pad the K-block count to a multiple of 4
            inv_b = F.pad(inv_b, (0, -k_blocks % 4), value=1.0)
        inv_b = inv_b.contiguous().t()[:k_blocks]  # (K/128, N/bb), a view of a row-major (N/bb, K/128) grid
    else:
        inv_b = inv_b.t().contiguous()  # (K/128, N/bb) row-major
    out = torch._scaled_mm(a.data, b.data.t(), scale_a=inv_a, scale_b=inv_b, out_dtype=torch.bfloat16)
    return out.to(out_dtype)


@functools.cache
def _direct_block_layout(device: str, b_rows_per_block: int, a_dtype: torch.dtype) -> int | None:
    """Probe once per (device, tile shape of b, dtype of a) whether ``_scaled_mm`` takes block
    scales here and agrees with the K-slice sum; the scale layout that works, or None."""
    if not device.startswith("cuda"):
        return None
    gen = torch.Generator(device=device).manual_seed(0)
    m, k, n = 256, 512, 384
    x = torch.randn(m, k, device=device, generator=gen)
    w = torch.randn(n, k, device=device, generator=gen)
    a = quantize(x, TILE_1x128, a_dtype)
    b = quantize(w, (b_rows_per_block, 128), E4M3)
    reference = _mm_block_kslices(a, b, torch.float32)
    for layout in range(len(_BLOCK_LAYOUTS)):
        try:
            direct = _mm_block_direct(a, b, torch.float32, layout)
        except (RuntimeError, ValueError, NotImplementedError) as err:
            logger.info("block-scaled _scaled_mm (layout %d) fails on %s: %s", layout, device, str(err)[:300])
            continue
        err_rel = ((direct - reference).norm() / reference.norm()).item()
        if err_rel < 2e-2:
            return layout
        logger.info("block-scaled _scaled_mm (layout %d) on %s: rel. err %.3g", layout, device, err_rel)
    logger.info("block-scaled _scaled_mm unusable on %s; block scaling uses K-slice sums", device)
    return None


def _mm_block_cuda(a: Float8Quantized, b: Float8Quantized, out_dtype: torch.dtype) -> torch.Tensor:
    """Block-scaled product on CUDA: cuBLAS block scaling where the probe validated it (and only on
    shapes like the probe's: M, N multiples of 128, K of 512), else the bf16 fallback."""
    m, k = a.data.shape
    n = b.data.shape[0]
    if m % 128 == 0 and n % 128 == 0 and k % 512 == 0:
        layout = _direct_block_layout(str(a.data.device), b.block[0], a.data.dtype)
        if layout is not None:
            try:
                return _mm_block_direct(a, b, out_dtype, layout)
            except (RuntimeError, ValueError) as err:
                logger.info(
                    "block-scaled _scaled_mm failed for %s x %s (%s); bf16 fallback", a.shape, b.shape, err
                )
    return _mm_block_dequantized(a, b, out_dtype)


def scaled_matmul(
    a: Float8Quantized,
    b: Float8Quantized,
    out_dtype: torch.dtype = torch.float32,
    *,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """``dequant(a) @ dequant(b)ᵀ`` computed in FP8: ``a`` is ``(M, K)``, ``b`` is ``(N, K)``, both
    quantised along K (tensorwise, rowwise, or in tiles 128 wide along K); result ``(M, N)``."""
    if a.data.ndim != 2 or b.data.ndim != 2 or a.data.shape[1] != b.data.shape[1]:
        raise ValueError(f"scaled_matmul needs (M, K) and (N, K) operands, got {a.shape} and {b.shape}")
    m, n = a.data.shape[0], b.data.shape[0]
    if a.data.is_cuda:  # cuBLAS: K and N multiples of 16 (M is free)
        k_to = _round_up(a.data.shape[1], _CUDA_ALIGN)
        a = _pad_fp8(a, m, k_to)
        b = _pad_fp8(b, _round_up(n, _CUDA_ALIGN), k_to)
    whole_or_row = (_is_whole(a) or _is_rowwise(a)) and (_is_whole(b) or _is_rowwise(b))
    if whole_or_row:
        out = _mm_rowwise_or_tensorwise(a, b, out_dtype, use_fast_accum)
    else:
        if a.block[1] != b.block[1]:
            raise ValueError(f"block operands must share the K tile width, got {a.block} and {b.block}")
        if a.data.is_cuda:
            out = _mm_block_cuda(a, b, out_dtype)
        else:
            out = _mm_block_kslices(a, b, out_dtype)
    return out[:m, :n]


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


def _transposed(q: Float8Quantized) -> Float8Quantized:
    """``q`` transposed with its data made contiguous (only for tensorwise and square-block scales,
    whose tiles stay valid under transposition)."""
    t = q.t()
    return Float8Quantized(t.data.contiguous(), t.scale.contiguous(), t.block)


class _Float8LinearFn(torch.autograd.Function):
    """``x @ Wᵀ`` with all three matmuls (forward, dgrad, wgrad) in FP8."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, recipe: Float8Recipe, out_dtype: torch.dtype
    ) -> torch.Tensor:
        # x (M, K), weight (N, K)
        xq = recipe.quantize(x, recipe.activation_block, E4M3)
        wq = recipe.quantize(weight, recipe.weight_block, E4M3)
        out = scaled_matmul(xq, wq, out_dtype, use_fast_accum=x.is_cuda)  # (M, N)
        ctx.recipe = recipe
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        ctx.w_block = wq.block
        if recipe.scaling == "tensorwise":  # keep FP8 copies: backward reuses them transposed
            ctx.save_for_backward(xq.data, xq.scale, wq.data, wq.scale)
        elif recipe.scaling == "block":  # 128×128 weight blocks survive transposition; x does not
            ctx.save_for_backward(x, wq.data, wq.scale)
        else:
            ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        recipe: Float8Recipe = ctx.recipe
        g = grad_out.contiguous()  # (M, N)
        saved = ctx.saved_tensors
        x_t: Float8Quantized | None
        w_t: Float8Quantized | None
        if recipe.scaling == "tensorwise":
            x_data, x_scale, w_data, w_scale = saved
            x_q = Float8Quantized(x_data, x_scale, tuple(x_data.shape))
            w_q = Float8Quantized(w_data, w_scale, tuple(w_data.shape))
            x_t = _transposed(x_q) if ctx.needs_input_grad[1] else None  # (K, M)
            w_t = _transposed(w_q) if ctx.needs_input_grad[0] else None  # (K, N)
        elif recipe.scaling == "block":
            x, w_data, w_scale = saved
            w_t = _transposed(Float8Quantized(w_data, w_scale, ctx.w_block))  # (K, N) 128×128
            x_t = recipe.quantize(x.t(), TILE_1x128, E4M3) if ctx.needs_input_grad[1] else None
        else:
            x, weight = saved
            w_t = recipe.quantize(weight.t(), ROWWISE, E4M3) if ctx.needs_input_grad[0] else None
            x_t = recipe.quantize(x.t(), ROWWISE, E4M3) if ctx.needs_input_grad[1] else None

        grad_x = grad_w = None
        gq: Float8Quantized | None = None
        # tensorwise: the weight gradient reuses these FP8 bits transposed (same single scale)
        if ctx.needs_input_grad[0] or (recipe.scaling == "tensorwise" and ctx.needs_input_grad[1]):
            gq = recipe.quantize(g, recipe.activation_block, recipe.grad_dtype)  # (M, N), along N
        if ctx.needs_input_grad[0]:
            assert gq is not None and w_t is not None
            grad_x = scaled_matmul(gq, w_t, ctx.x_dtype)  # (M, K)
        if ctx.needs_input_grad[1]:
            if recipe.scaling == "tensorwise" and gq is not None:
                g_t = _transposed(gq)  # one scale for the tensor: the same FP8 bits, transposed
            else:
                g_t = recipe.quantize(g.t(), recipe.activation_block, recipe.grad_dtype)  # (N, M), along M
            assert x_t is not None
            grad_w = scaled_matmul(g_t, x_t, torch.float32).to(ctx.w_dtype)  # (N, K)
        return grad_x, grad_w, None, None


def float8_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: Float8Recipe
) -> torch.Tensor:
    """``F.linear`` with FP8 matmuls; ``x`` ``(..., K)``, ``weight`` ``(N, K)``; output in the
    autocast dtype when autocast is on, else in ``x.dtype``; bias added in that dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        out_dtype = torch.get_autocast_dtype(device_type)
    else:
        out_dtype = x.dtype
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])  # (M, K)
    out = _Float8LinearFn.apply(x2d, weight, recipe, out_dtype)  # (M, N)
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out.reshape(*lead, weight.shape[0])


class Float8Linear(nn.Linear):
    """An ``nn.Linear`` computing in FP8 through ``torch._scaled_mm``; the weight (fp32 or bf16
    master) and bias stay in high precision and are what the optimizer updates."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        scaling: Scaling = "tensorwise",
        grad_dtype: torch.dtype = E5M2,
        power_of_two_scales: bool = False,
        margin: int = 0,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = Float8Recipe(scaling, grad_dtype, power_of_two_scales, margin)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **recipe: Any) -> Float8Linear:
        """A `Float8Linear` holding the very Parameters of ``linear`` (no copy; optimizer state,
        weight tying and ZeRO bookkeeping keep pointing at them)."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **recipe)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float8_linear(x, self.weight, self.bias, self.recipe)

    def extra_repr(self) -> str:
        r = self.recipe
        return (
            f"{super().extra_repr()}, scaling={r.scaling}, grad_dtype={str(r.grad_dtype).split('.')[-1]}"
            f"{', power_of_two_scales=True' if r.power_of_two_scales else ''}"
        )


@functools.cache
def scaled_mm_unusable_reason(device: str) -> str | None:
    """None when ``torch._scaled_mm`` runs on ``device`` (a tiny tensorwise and rowwise e4m3 × e4m3
    and e5m2 × e4m3 product), else why not."""
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no torch._scaled_mm / float8 dtypes"
    try:
        dev = torch.device(device)
        x = torch.randn(32, 32, device=dev)
        for scaling in ("tensorwise", "rowwise"):
            recipe = Float8Recipe(scaling)  # type: ignore[arg-type]
            a = recipe.quantize(x, recipe.activation_block, E4M3)
            g = recipe.quantize(x, recipe.activation_block, E5M2)
            scaled_matmul(a, a, torch.float32)
            scaled_matmul(g, a, torch.float32)
    except Exception as err:  # the probe must report any failure, not raise it
        return f"torch._scaled_mm does not run on {device}: {type(err).__name__}: {str(err)[:200]}"
    return None
