"""Native FP8 routed experts (`Float8GroupedExperts`, tensorwise recipe: `_Float8ExpertsMLP`)
against a float64 emulation that quantises the same tensors with the same scales."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from deepsuite.fp8.experts import Float8GroupedExperts
from deepsuite.fp8.native import Float8Recipe
from deepsuite.fp8.quant import E4M3, E5M2, ROWWISE, TENSORWISE, quantize
from deepsuite.layers.moe import GroupedExperts

E, D, I = 6, 64, 32
COUNTS = [11, 0, 30, 1, 17, 5]  # an empty expert and a one-row expert


def _fq(t: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """Tensorwise fake quantisation in float64."""
    return quantize(t.detach().float(), TENSORWISE, dtype).dequantize(torch.float64)


def _emulate(x, w1, w2, counts, grad_y, grad_dtype):
    """Forward output and (dx, dW1, dW2) with each FP8 operand fake-quantised, math in float64."""
    w1q = torch.stack([_fq(w) for w in w1])  # one scale per expert
    w2q = torch.stack([_fq(w) for w in w2])
    xq, gq = _fq(x), _fq(grad_y, grad_dtype)  # one scale for all rows
    rows = torch.tensor(counts).cumsum(0).tolist()
    starts = [r - n for r, n in zip(rows, counts)]
    h = torch.cat([xq[s : s + n] @ w1q[e].T for e, (s, n) in enumerate(zip(starts, counts))])
    gate, up = h.chunk(2, dim=-1)
    a = F.silu(gate) * up
    aq = _fq(a)
    y = torch.cat([aq[s : s + n] @ w2q[e].T for e, (s, n) in enumerate(zip(starts, counts))])
    da = torch.cat([gq[s : s + n] @ w2q[e] for e, (s, n) in enumerate(zip(starts, counts))])
    gw2 = torch.stack([gq[s : s + n].T @ aq[s : s + n] for s, n in zip(starts, counts)])
    sig = torch.sigmoid(gate)
    dh = torch.cat([da * up * sig * (1 + gate * (1 - sig)), da * gate * sig], dim=-1)
    dhq = _fq(dh, grad_dtype)
    dx = torch.cat([dhq[s : s + n] @ w1q[e] for e, (s, n) in enumerate(zip(starts, counts))])
    gw1 = torch.stack([dhq[s : s + n].T @ xq[s : s + n] for s, n in zip(starts, counts)])
    return y, dx, gw1, gw2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("grad_dtype", [E5M2, E4M3])
def test_grouped_fp8_experts_match_the_float64_emulation(grad_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    ref = GroupedExperts(E, D, I)
    ref.init_weights(0.1)
    experts = Float8GroupedExperts.from_experts(ref, Float8Recipe("tensorwise", grad_dtype))
    x = torch.randn(sum(COUNTS), D, requires_grad=True)
    y = experts(x, COUNTS)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    want = _emulate(x, ref.gate_up_proj, ref.down_proj, COUNTS, grad_y, grad_dtype)
    got = (y, x.grad, experts.gate_up_proj.grad, experts.down_proj.grad)
    for name, g, w in zip(("y", "dx", "dW_gate_up", "dW_down"), got, want):
        # the same quantised operands: only float32 accumulation and the odd FP8 rounding flip
        assert _rel(g, w) < 2e-3, name
    assert (experts.gate_up_proj.grad[1] == 0).all() and (experts.down_proj.grad[1] == 0).all()
    # and close to the high-precision experts, within the FP8 formats' error
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = ref(x_ref, COUNTS)
    assert _rel(y, y_ref) < 0.08


def test_grouped_fp8_experts_under_autocast_return_the_autocast_dtype() -> None:
    torch.manual_seed(0)
    ref = GroupedExperts(E, D, I)
    ref.init_weights(0.1)
    experts = Float8GroupedExperts.from_experts(ref, Float8Recipe("tensorwise"))
    x = torch.randn(sum(COUNTS), D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, COUNTS)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert experts.gate_up_proj.grad.dtype == torch.float32


@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise", "block"])
def test_no_rows_give_zero_weight_gradients(scaling: str) -> None:
    """A rank that receives no tokens (expert parallelism): the output is empty and every expert
    weight gets a zero gradient, like the plain experts, so all replicas reduce the same grads."""
    torch.manual_seed(0)
    plain = GroupedExperts(E, D, I)
    plain.init_weights(std=0.1)
    fp8 = Float8GroupedExperts.from_experts(copy.deepcopy(plain), Float8Recipe(scaling))  # type: ignore[arg-type]
    for experts in (plain, fp8):
        x = torch.zeros(0, D, requires_grad=True)
        out = experts(x, [0] * E)
        assert out.shape == (0, D)
        out.sum().backward()
        for p in (experts.gate_up_proj, experts.down_proj):
            assert p.grad is not None and not p.grad.any()


def test_checkpoint_recompute_does_not_count_the_load_twice() -> None:
    """Activation checkpointing recomputes a MoE layer in backward: its tokens_per_expert (what the
    bias update and the load metrics read) counts the step's tokens once."""
    from torch.utils.checkpoint import checkpoint

    from deepsuite.layers.moe import DeepSeekMoE

    torch.manual_seed(0)
    moe = DeepSeekMoE(D, n_routed_experts=E, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=I)
    moe.init_weights(std=0.1)
    moe.train()
    x = torch.randn(2, 5, D, requires_grad=True)
    checkpoint(moe, x, use_reentrant=False).sum().backward()
    assert moe.tokens_per_expert.sum().item() == 2 * 5 * 2  # tokens x top-k, not twice that


def _fq_rows(t: torch.Tensor) -> torch.Tensor:
    """Rowwise e4m3 fake quantisation (one scale per row, along the last dim) in float64."""
    return quantize(t.detach().float(), ROWWISE, E4M3).dequantize(torch.float64)


def test_grouped_scaled_mm_path_matches_a_rowwise_float64_emulation() -> None:
    """`_Float8GroupedMLP` (the torch._scaled_grouped_mm path, emulated on CPU): forward and both
    dgrads from rowwise-e4m3 operands (weights per output row forward, per input column for
    dgrad), weight gradients from the unquantised bf16 operands; device-side counts accepted."""
    torch.manual_seed(0)
    ref = GroupedExperts(E, D, I)
    ref.init_weights(0.1)
    experts = Float8GroupedExperts.from_experts(ref, Float8Recipe("rowwise"))
    experts.grouped = "grouped"
    x = torch.randn(sum(COUNTS), D).bfloat16().float().requires_grad_(True)
    y = experts(x, torch.tensor(COUNTS))
    grad_y = torch.randn_like(y).bfloat16().float()
    y.backward(grad_y)

    w1, w2 = ref.gate_up_proj.detach(), ref.down_proj.detach()
    rows = torch.tensor(COUNTS).cumsum(0).tolist()
    spans = [(r - n, n) for r, n in zip(rows, COUNTS)]
    xq = _fq_rows(x.bfloat16())
    h = torch.cat([xq[s : s + n] @ _fq_rows(w1[e]).T for e, (s, n) in enumerate(spans)])
    h = h.bfloat16().double()  # the GEMM writes bf16
    gate, up = h.chunk(2, dim=-1)
    a = (F.silu(gate) * up).bfloat16().double()
    want_y = torch.cat([_fq_rows(a)[s : s + n] @ _fq_rows(w2[e]).T for e, (s, n) in enumerate(spans)])
    gq = _fq_rows(grad_y.bfloat16())
    da = torch.cat([gq[s : s + n] @ _fq_rows(w2[e].T).T for e, (s, n) in enumerate(spans)])
    da = da.bfloat16().double()
    sig = torch.sigmoid(gate)
    dh = torch.cat([da * up * sig * (1 + gate * (1 - sig)), da * gate * sig], dim=-1).bfloat16().double()
    want_dx = torch.cat([_fq_rows(dh)[s : s + n] @ _fq_rows(w1[e].T).T for e, (s, n) in enumerate(spans)])
    g = grad_y.double()
    want_gw2 = torch.stack([g[s : s + n].T @ a[s : s + n] for s, n in spans])
    want_gw1 = torch.stack([dh[s : s + n].T @ x.detach().double()[s : s + n] for s, n in spans])
    # 1.6e-3 measured (bf16 roundings); quantising along a wrong axis gives several per cent
    for got, want in ((y, want_y), (x.grad, want_dx), (ref.gate_up_proj.grad, want_gw1)):
        assert _rel(got, want) < 5e-3
    assert _rel(ref.down_proj.grad, want_gw2) < 5e-3
    assert float(ref.gate_up_proj.grad[1].abs().max()) == 0.0  # the expert without rows
    assert float(ref.down_proj.grad[1].abs().max()) == 0.0
