"""Native `Float8Linear`: exact against an fp64 emulation of the same quantisation, and within the
formats' error of an fp32 linear, forward and backward, for every scaling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepsuite.fp8.native import Float8Linear, Float8Recipe, _pad_fp8, scaled_matmul
from deepsuite.fp8.quant import E4M3, E5M2, ROWWISE, TENSORWISE, BLOCK_128x128, TILE_1x128, quantize

SCALINGS = ["tensorwise", "rowwise", "block"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _fq(x: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Fake-quantise in fp64: the value an FP8 matmul really multiplies."""
    return quantize(x.contiguous(), block, dtype).dequantize(torch.float64)


def _emulated(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, recipe: Float8Recipe):
    """fp64 reference of the three FP8 matmuls, each operand quantised along its contraction dim."""
    act, wb, gd = recipe.activation_block, recipe.weight_block, recipe.grad_dtype
    y = _fq(x, act, E4M3) @ _fq(w, wb, E4M3).t()
    if recipe.scaling == "rowwise":
        w_t = _fq(w.t(), ROWWISE, E4M3)  # re-quantised per column of W
        x_t = _fq(x.t(), ROWWISE, E4M3)
    elif recipe.scaling == "block":
        w_t = _fq(w, BLOCK_128x128, E4M3).t()  # the forward's blocks, transposed
        x_t = _fq(x.t(), TILE_1x128, E4M3)  # 128×1 tiles of x
    else:
        w_t = _fq(w, TENSORWISE, E4M3).t()
        x_t = _fq(x, TENSORWISE, E4M3).t()
    dx = _fq(g, act, gd) @ w_t.t()
    dw = _fq(g.t(), act, gd) @ x_t.t()
    return y, dx, dw


def _data(m: int = 150, k: int = 200, n: int = 136, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * 0.05
    g = torch.randn(m, n, generator=gen)
    return x, w, g


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("grad_dtype", [E5M2, E4M3], ids=["e5m2", "e4m3"])
def test_float8_linear_matches_fp64_emulation(scaling: str, grad_dtype: torch.dtype) -> None:
    """The scaled-matmul plumbing (scales, layouts, transposes, K slices) is exact up to fp32
    accumulation: y, dx and dW equal the fp64 products of the quantised operands."""
    x, w, g = _data()
    lin = Float8Linear(200, 136, bias=False, scaling=scaling, grad_dtype=grad_dtype)  # type: ignore[arg-type]
    with torch.no_grad():
        lin.weight.copy_(w)
    xr = x.clone().requires_grad_()
    y = lin(xr)
    y.backward(g)
    y_ref, dx_ref, dw_ref = _emulated(x, w, g, lin.recipe)
    assert _rel(y, y_ref) < 1e-5
    assert _rel(xr.grad, dx_ref) < 1e-5
    assert _rel(lin.weight.grad, dw_ref) < 1e-5


@pytest.mark.parametrize("scaling", SCALINGS)
def test_float8_linear_close_to_fp32_linear(scaling: str) -> None:
    """Against the exact fp32 linear the error is the formats' own: e4m3 (3 mantissa bits) gives
    ~3.5 % norm-wise on Gaussian data, e5m2 gradients ~6 %. (A 1e-2 bound is below what 3-bit
    mantissas allow on random data; bf16 itself is ~3e-3.)"""
    torch.manual_seed(0)
    ref = nn.Linear(200, 136)
    f8 = Float8Linear.from_linear(nn.Linear(200, 136), scaling=scaling)  # type: ignore[arg-type]
    f8.load_state_dict(ref.state_dict())
    x = torch.randn(4, 37, 200)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), f8(xb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert yb.shape == ya.shape
    assert _rel(yb, ya) < 0.045
    assert _rel(xb.grad, xa.grad) < 0.08
    assert _rel(f8.weight.grad, ref.weight.grad) < 0.08
    torch.testing.assert_close(f8.bias.grad, ref.bias.grad)  # bias stays in high precision
    # e4m3 gradients are tighter than e5m2 ones
    f8_e4 = Float8Linear.from_linear(ref, scaling=scaling, grad_dtype=E4M3)  # type: ignore[arg-type]
    xc = x.clone().requires_grad_()
    ref.weight.grad = None
    f8_e4(xc).backward(g)
    assert _rel(xc.grad, xa.grad) < 0.05


def test_from_linear_shares_parameters() -> None:
    lin = nn.Linear(32, 48)
    f8 = Float8Linear.from_linear(lin, scaling="rowwise")
    assert f8.weight is lin.weight and f8.bias is lin.bias
    assert f8.recipe.scaling == "rowwise" and "rowwise" in repr(f8)
    assert isinstance(f8, nn.Linear)


def test_autocast_bf16_output_and_fp32_master_grads() -> None:
    torch.manual_seed(0)
    f8 = Float8Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = f8(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and f8.weight.grad.dtype == torch.float32
    assert f8.bias.grad.dtype == torch.float32


def test_bad_recipe_raises() -> None:
    with pytest.raises(ValueError, match="scaling"):
        Float8Recipe("columnwise")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grad_dtype"):
        Float8Recipe("tensorwise", grad_dtype=torch.bfloat16)


@pytest.mark.parametrize(
    ("block_a", "block_b"),
    [
        (TENSORWISE, TENSORWISE),
        (ROWWISE, ROWWISE),
        (TENSORWISE, ROWWISE),
        (TILE_1x128, BLOCK_128x128),
        (TILE_1x128, TILE_1x128),
    ],
)
def test_scaled_matmul_equals_dequantised_product(block_a, block_b) -> None:
    x, w, _ = _data(m=70, k=300, n=90, seed=1)
    a, b = quantize(x, block_a, E5M2), quantize(w, block_b, E4M3)
    ref = a.dequantize(torch.float64) @ b.dequantize(torch.float64).t()
    assert _rel(scaled_matmul(a, b), ref) < 1e-6


def test_zero_padding_keeps_the_product() -> None:
    """The CUDA alignment padding (zeros in K and N; scale rows of one) leaves the product unchanged."""
    x, w, _ = _data(m=30, k=100, n=40, seed=2)
    for block in (TENSORWISE, ROWWISE, TILE_1x128):
        a = quantize(x, block, E4M3)
        b = quantize(w, block if block != TILE_1x128 else BLOCK_128x128, E4M3)
        pa, pb = _pad_fp8(a, 30, 112), _pad_fp8(b, 48, 112)
        assert pa.data.shape == (30, 112) and pb.data.shape == (48, 112)
        torch.testing.assert_close(scaled_matmul(pa, pb)[:, :40], scaled_matmul(a, b))
