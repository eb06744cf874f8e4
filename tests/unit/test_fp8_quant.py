"""FP8 quantisation: error within each format's rounding bound, saturation, zeros, scale options."""

from __future__ import annotations

import math

import pytest
import torch

from deepsuite.fp8.quant import (
    COLWISE,
    E4M3,
    E5M2,
    ROWWISE,
    TENSORWISE,
    BLOCK_128x128,
    TILE_1x128,
    amax_to_scale,
    block_amax,
    fp8_max,
    quantize,
)

BLOCKS = [TENSORWISE, ROWWISE, COLWISE, TILE_1x128, BLOCK_128x128]
# (mantissa bits, exponent of the smallest normal, exponent of the smallest subnormal)
FORMATS = {E4M3: (3, -6, -9), E5M2: (2, -14, -16)}


def _wide_range(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Gaussian values times a log-normal spread: covers several binades, per-row scale differences."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return (x * torch.exp(1.5 * torch.randn(rows, 1, generator=gen, dtype=torch.float64))).float()


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("block", BLOCKS, ids=["tensor", "row", "col", "1x128", "128x128"])
def test_round_trip_error_within_format_bound(dtype: torch.dtype, block: tuple[int, int]) -> None:
    """Round to nearest: relative error ≤ 2^-(m+1) for values that scale into the normal range
    (2^-4 for e4m3, 2^-3 for e5m2); absolute error ≤ half the subnormal spacing below it.
    Shapes deliberately not multiples of 128."""
    mantissa, min_normal_exp, min_sub_exp = FORMATS[dtype]
    x = _wide_range(300, 200)
    q = quantize(x, block, dtype)
    rows_per, cols_per = q.block
    assert q.data.dtype == dtype and q.data.shape == x.shape
    assert q.scale.shape == (math.ceil(300 / rows_per), math.ceil(200 / cols_per))
    scaled = x.double() * q.expanded_scale().double()
    assert scaled.abs().max() <= fp8_max(dtype) * (1 + 1e-6)  # fp32 rounding of amax · scale; clamped
    err = (q.data.double() - scaled).abs()  # error in the scaled (FP8) domain
    normal = scaled.abs() >= 2.0**min_normal_exp
    assert normal.float().mean() > 0.9  # the test really exercises normal values
    rel = err[normal] / scaled.abs()[normal]
    assert rel.max() <= 2.0 ** -(mantissa + 1) + 1e-12
    if (~normal).any():
        assert err[~normal].max() <= 2.0 ** (min_sub_exp - 1) + 1e-12
    # and the dequantised values are within the same relative bound of the input
    back = q.dequantize(torch.float64)
    assert (back - x.double()).abs()[normal].div(x.double().abs()[normal]).max() <= 2.0 ** -(
        mantissa + 1
    ) + 1e-9


@pytest.mark.parametrize("block", BLOCKS, ids=["tensor", "row", "col", "1x128", "128x128"])
def test_tile_amax_maps_to_format_max(block: tuple[int, int]) -> None:
    """Each tile's largest magnitude lands on fp8_max: the full range is used, nothing overflows."""
    x = _wide_range(260, 300, seed=1)
    q = quantize(x, block, E4M3)
    data_amax = block_amax(q.data.float(), q.block)
    torch.testing.assert_close(data_amax, torch.full_like(data_amax, fp8_max(E4M3)))


def test_block_amax_matches_loop() -> None:
    x = _wide_range(200, 300, seed=2)
    grid = block_amax(x, BLOCK_128x128)
    assert grid.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            tile = x[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            assert grid[i, j] == tile.abs().max()


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_saturation_clamps_instead_of_nan(dtype: torch.dtype) -> None:
    """With a stale (too small) amax, e.g. delayed scaling, values beyond the range clamp to ±max."""
    x = torch.tensor([[-1000.0, -2.0, 0.5, 3.0, 1000.0]])
    q = quantize(x, TENSORWISE, dtype, amax=torch.tensor([[3.0]]))
    data = q.data.float()
    assert torch.isfinite(data).all()
    assert data[0, 0] == -fp8_max(dtype) and data[0, -1] == fp8_max(dtype)
    assert data[0, 3] == fp8_max(dtype)  # the amax itself maps to max
    torch.testing.assert_close(q.dequantize()[0, 1:4], x[0, 1:4], rtol=2**-3, atol=0)


@pytest.mark.parametrize("block", BLOCKS, ids=["tensor", "row", "col", "1x128", "128x128"])
def test_zeros_and_zero_tiles(block: tuple[int, int]) -> None:
    x = torch.zeros(130, 140)
    x[:2, :3] = torch.tensor([[1.0, -2.0, 3.0], [0.25, 0.0, -0.5]])
    q = quantize(x, block, E4M3)
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    back = q.dequantize()
    assert torch.isfinite(back).all()
    assert (back[2:] == 0).all() and (back[:, 3:] == 0).all()
    torch.testing.assert_close(back[:2, :3], x[:2, :3], rtol=2**-4, atol=0)


def test_power_of_two_scales() -> None:
    x = _wide_range(256, 256, seed=3)
    q = quantize(x, BLOCK_128x128, E4M3, power_of_two=True)
    log2 = torch.log2(q.scale)
    torch.testing.assert_close(log2, log2.round(), rtol=0, atol=0)
    data_amax = block_amax(q.data.float(), q.block)
    assert (data_amax <= fp8_max(E4M3)).all() and (data_amax > fp8_max(E4M3) / 2).all()
    # dequantisation by a power of two is exact: fp8 value / scale has no rounding
    torch.testing.assert_close(q.dequantize(torch.float64) * q.expanded_scale().double(), q.data.double())


def test_margin_halves_the_scale() -> None:
    amax = torch.tensor([[2.0]])
    torch.testing.assert_close(amax_to_scale(amax, E4M3, margin=1), amax_to_scale(amax, E4M3) / 2)
    torch.testing.assert_close(amax_to_scale(amax, E5M2), torch.tensor([[57344.0 / 2]]))


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="FP8 dtype"):
        quantize(torch.randn(2, 3), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="positive"):
        quantize(torch.randn(2, 3), block=(0, 4))


def test_transpose_of_square_blocks_is_exact() -> None:
    """128×128 blocks survive transposition (the backward reuses the forward's FP8 weight)."""
    w = _wide_range(256, 384, seed=4)
    q = quantize(w, BLOCK_128x128, E4M3)
    torch.testing.assert_close(q.t().dequantize(), q.dequantize().t())
