"""Native FP8 on CUDA: ``torch._scaled_mm`` layouts and scales, `Float8Linear` vs bf16, prepare_fp8."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from deepsuite.config.schema import FP8Config
from deepsuite.fp8 import Float8Linear, prepare_fp8
from deepsuite.fp8.native import _direct_block_layout, _mm_block_kslices, scaled_matmul
from deepsuite.fp8.quant import E4M3, E5M2, ROWWISE, TENSORWISE, BLOCK_128x128, TILE_1x128, quantize

pytestmark = pytest.mark.gpu


def _capability_skip(minimum: tuple[int, int], what: str) -> pytest.MarkDecorator:
    if not torch.cuda.is_available():
        return pytest.mark.skipif(True, reason=f"needs CUDA (torch {torch.__version__} sees no GPU)")
    capability = torch.cuda.get_device_capability()
    return pytest.mark.skipif(
        capability < minimum, reason=f"{what} need compute capability >= {minimum}, this GPU has {capability}"
    )


needs_fp8 = _capability_skip((8, 9), "FP8 matmuls")
needs_hopper = _capability_skip((9, 0), "rowwise / block-scaled _scaled_mm kernels")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@needs_fp8
@pytest.mark.parametrize(
    ("block_a", "block_b", "dtype_a"),
    [
        (TENSORWISE, TENSORWISE, E4M3),
        (TENSORWISE, TENSORWISE, E5M2),
        (ROWWISE, ROWWISE, E4M3),
        (ROWWISE, ROWWISE, E5M2),
        (TILE_1x128, BLOCK_128x128, E4M3),
        (TILE_1x128, TILE_1x128, E5M2),
    ],
)
def test_scaled_matmul_equals_dequantised_product(block_a, block_b, dtype_a) -> None:
    """On CUDA the FP8 product equals the fp64 product of the dequantised operands (up to the
    bf16 output / accumulation order), including shapes that need padding to 16."""
    if block_a == ROWWISE and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("rowwise _scaled_mm needs Hopper")
    torch.manual_seed(0)
    m, k, n = 200, 520, 328  # K, N not multiples of 128; M not a multiple of 16
    a = quantize(torch.randn(m, k, device="cuda"), block_a, dtype_a)
    b = quantize(torch.randn(n, k, device="cuda"), block_b, E4M3)
    out = scaled_matmul(a, b, torch.float32)
    ref = a.dequantize(torch.float64) @ b.dequantize(torch.float64).t()
    assert out.shape == (m, n)
    assert _rel(out, ref) < 5e-3


@needs_hopper
def test_block_scaled_mm_probe_consistent(caplog: pytest.LogCaptureFixture) -> None:
    """Whatever the probe chose (direct block-scaled cuBLAS call or the bf16 fallback), the result
    matches the K-slice reference; prints which one is used and why."""
    _direct_block_layout.cache_clear()
    with caplog.at_level(logging.INFO, logger="deepsuite.fp8.native"):
        layout = _direct_block_layout("cuda", 128, E4M3)
    print("\n".join(r.getMessage() for r in caplog.records))
    print(f"direct block-scaled _scaled_mm layout: {layout}")
    torch.manual_seed(1)
    for b_block, a_dtype in ((BLOCK_128x128, E4M3), (TILE_1x128, E5M2)):  # forward/dgrad, wgrad
        for m, k, n in ((512, 1024, 768), (1024, 2048, 1024)):  # shapes that take the direct path
            a = quantize(torch.randn(m, k, device="cuda"), TILE_1x128, a_dtype)
            b = quantize(torch.randn(n, k, device="cuda"), b_block, E4M3)
            assert _rel(scaled_matmul(a, b), _mm_block_kslices(a, b, torch.float32)) < 1e-2, (
                b_block,
                m,
                k,
                n,
            )


@needs_fp8
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise", "block"])
def test_float8_linear_cuda_close_to_bf16(scaling: str) -> None:
    if scaling != "tensorwise" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("rowwise/block kernels need Hopper")
    torch.manual_seed(0)
    ref = nn.Linear(1024, 768, device="cuda")
    f8 = Float8Linear.from_linear(nn.Linear(1024, 768, device="cuda"), scaling=scaling)
    with torch.no_grad():
        f8.weight.copy_(ref.weight)
        f8.bias.copy_(ref.bias)
    x = torch.randn(4, 250, 1024, device="cuda")
    x_ref = x.clone().requires_grad_()
    x_f8 = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_ref = ref(x_ref)
        y_f8 = f8(x_f8)
    assert y_f8.dtype == torch.bfloat16 and y_f8.shape == y_ref.shape
    g = torch.randn_like(y_ref)
    (y_ref.float() * g).sum().backward()
    (y_f8.float() * g).sum().backward()
    assert _rel(y_f8, y_ref) < 0.05  # e4m3: ~2^-4 per element, ~3.5 % norm-wise on Gaussian data
    assert _rel(x_f8.grad, x_ref.grad) < 0.08  # e5m2 gradients: ~2^-3 per element
    assert _rel(f8.weight.grad, ref.weight.grad) < 0.08
    assert f8.weight.grad.dtype == torch.float32


@needs_fp8
def test_prepare_fp8_gpt_debug_trains_on_cuda() -> None:
    from deepsuite.models import build_model

    torch.manual_seed(0)
    model = build_model(name="gpt", flavor="gpt2-debug", device="cuda")
    ctx = prepare_fp8(model, FP8Config(enabled=True))
    print(ctx.summary)
    assert ctx.backend in ("te", "native") and ctx.converted
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, model.args.vocab_size, (8, 64), device="cuda")
    losses = []
    for _ in range(20):
        with ctx.autocast(), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids.roll(-1, dims=1)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@needs_fp8
def test_grouped_fp8_experts_on_cuda_match_the_cpu_emulated_kernels() -> None:
    """`_Float8ExpertsMLP` (tensorwise) on CUDA computes what the CPU path computes from the same
    quantised operands: outputs and all three gradients within float32-accumulation error."""
    from deepsuite.fp8.experts import Float8GroupedExperts
    from deepsuite.fp8.native import Float8Recipe
    from deepsuite.layers.moe import GroupedExperts

    torch.manual_seed(0)
    counts = [40, 0, 129, 3, 77, 16]  # rows not multiples of 16: the wgrad K dimension gets padded
    ref = GroupedExperts(6, 256, 128)
    ref.init_weights(0.1)
    results = {}
    for device in ("cpu", "cuda"):
        base = GroupedExperts(6, 256, 128).to(device)
        base.load_state_dict(ref.state_dict())
        experts = Float8GroupedExperts.from_experts(base, Float8Recipe("tensorwise"))
        experts.grouped = "per_expert"  # the tensorwise kernels on both devices
        x = torch.randn(sum(counts), 256, generator=torch.Generator().manual_seed(1)).to(device)
        x.requires_grad_(True)
        y = experts(x, counts)
        y.backward(torch.ones_like(y))
        results[device] = [
            t.detach().cpu().double() for t in (y, x.grad, base.gate_up_proj.grad, base.down_proj.grad)
        ]
    for got, want in zip(results["cuda"], results["cpu"]):
        assert ((got - want).norm() / want.norm()).item() < 1e-2


@needs_hopper
def test_grouped_scaled_mm_experts_match_their_cpu_emulation_and_bf16() -> None:
    """`_Float8GroupedMLP` on ``torch._scaled_grouped_mm`` (chosen by "auto" on Hopper) computes
    what its CPU emulation computes from the same operands (bf16 output rounding apart), with
    device-side counts, an expert without rows (zero gradients) and groups not multiples of 16;
    and stays within FP8 error of the bf16 grouped experts."""
    from deepsuite.fp8.experts import Float8GroupedExperts, grouped_fp8_unusable_reason
    from deepsuite.fp8.native import Float8Recipe
    from deepsuite.layers.moe import GroupedExperts

    assert grouped_fp8_unusable_reason(torch.device("cuda")) is None
    torch.manual_seed(0)
    counts = [40, 0, 129, 3, 77, 16]
    ref = GroupedExperts(6, 256, 128)
    ref.init_weights(0.1)
    x0 = torch.randn(sum(counts), 256, generator=torch.Generator().manual_seed(1))
    results = {}
    for label, device, grouped in (
        ("cpu", "cpu", "grouped"),
        ("cuda", "cuda", "auto"),
        ("bf16", "cuda", None),
    ):
        base = GroupedExperts(6, 256, 128).to(device)
        base.load_state_dict(ref.state_dict())
        experts = base
        if grouped is not None:
            experts = Float8GroupedExperts.from_experts(base, Float8Recipe("rowwise"))
            experts.grouped = grouped
        x = x0.detach().to(device).clone().requires_grad_(True)
        with torch.autocast(device, dtype=torch.bfloat16):
            y = experts(x, torch.tensor(counts, device=device))
        y.float().backward(torch.ones_like(y, dtype=torch.float32))
        assert float(base.gate_up_proj.grad[1].abs().max()) == 0.0
        results[label] = [
            t.detach().cpu().double() for t in (y, x.grad, base.gate_up_proj.grad, base.down_proj.grad)
        ]
    for got, want in zip(results["cuda"], results["cpu"]):
        assert _rel(got, want) < 2e-2
    for got, want in zip(results["cuda"], results["bf16"]):
        assert _rel(got, want) < 0.1


def test_grouped_mm_with_device_counts_matches_the_loop() -> None:
    """bf16 experts on CUDA: `TokenDispatcher` keeps the counts on the device and the grouped GEMMs
    with the fused SwiGLU give the per-expert loop's outputs and gradients."""
    from deepsuite.layers.moe import DeepSeekMoE

    torch.manual_seed(0)
    moe = DeepSeekMoE(256, 8, 1, 2, 128, n_expert_groups=2, n_limited_groups=1).cuda().bfloat16()
    moe.init_weights(0.05)
    x = torch.randn(2, 64, 256, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for impl in ("auto", "loop"):
        moe.zero_grad(set_to_none=True)
        moe.experts.implementation = impl
        xi = x.clone().requires_grad_(True)
        y = moe(xi)
        y.float().square().mean().backward()
        outs[impl] = [y.float(), xi.grad.float(), moe.experts.gate_up_proj.grad.float()]
    for got, want in zip(outs["auto"], outs["loop"]):
        assert _rel(got, want) < 2e-2
