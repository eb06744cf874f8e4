"""DeepSeekMoE against a float64 reference written as a dense loop over experts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepsuite.layers.moe import (
    DeepSeekMoE,
    GroupedExperts,
    MoERouter,
    TokenDispatcher,
    sequence_balance_loss,
)

D, I, E = 16, 8, 8


def make_moe(**kw: object) -> DeepSeekMoE:
    torch.manual_seed(0)
    args: dict = dict(n_routed_experts=E, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=I)
    args.update(kw)
    moe = DeepSeekMoE(D, **args)
    moe.init_weights(std=0.3)
    with torch.no_grad():
        moe.e_score_correction_bias.copy_(0.1 * torch.randn(E))
    return moe


def reference_route(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    groups: int,
    keep: int,
    func: str,
    scale: float,
    norm: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loops in float64: (dense weights (N, E), chosen mask (N, E))."""
    n_tok, n_exp = x.shape[0], w.shape[0]
    logits = x.double() @ w.double().T
    scores = logits.sigmoid() if func == "sigmoid" else logits.softmax(-1)
    dense = torch.zeros(n_tok, n_exp, dtype=torch.float64)
    chosen = torch.zeros(n_tok, n_exp, dtype=torch.bool)
    per = n_exp // groups
    for t in range(n_tok):
        biased = (scores[t] + bias.double()).tolist()
        group_score = []
        for g in range(groups):
            members = sorted(biased[g * per : (g + 1) * per], reverse=True)
            group_score.append(sum(members[:2]) if func == "sigmoid" else members[0])
        kept = sorted(range(groups), key=lambda g: -group_score[g])[:keep]
        allowed = [e for e in range(n_exp) if e // per in kept]
        top = sorted(allowed, key=lambda e: -biased[e])[:k]
        weights = torch.stack([scores[t, e] for e in top])
        if norm:
            weights = weights / weights.sum()
        for e, wt in zip(top, weights * scale):
            dense[t, e] = wt
            chosen[t, e] = True
    return dense, chosen


def reference_moe(moe: DeepSeekMoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token (float64), weighted by the dense routing weights."""
    g = moe.gate
    flat = x.reshape(-1, D).double()
    dense, _ = reference_route(
        flat,
        g.weight,
        g.e_score_correction_bias,
        g.top_k,
        g.n_groups,
        g.topk_groups,
        g.score_func,
        g.route_scale,
        g.norm_topk_prob,
    )
    out = torch.zeros_like(flat)
    gate_up, down = moe.experts.gate_up_proj.double(), moe.experts.down_proj.double()
    for e in range(moe.n_routed_experts):
        gate, up = (flat @ gate_up[e].T).chunk(2, dim=-1)
        out = out + dense[:, e : e + 1] * ((F.silu(gate) * up) @ down[e].T)
    if moe.shared_experts is not None:
        s = moe.shared_experts
        out = (
            out
            + s.down_proj.weight.double()
            .matmul((F.silu(flat @ s.gate_proj.weight.double().T) * (flat @ s.up_proj.weight.double().T)).T)
            .T
        )
    return out.view(x.shape)


CASES = {
    "sigmoid_groups": dict(n_expert_groups=4, n_limited_groups=2, route_scale=2.5),
    "sigmoid_plain_top3": dict(n_activated_experts=3),
    "softmax_groups_unnormalised": dict(
        score_func="softmax", n_expert_groups=2, n_limited_groups=1, norm_topk_prob=False
    ),
    "two_shared": dict(n_shared_experts=2, n_expert_groups=2, n_limited_groups=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_float64_reference(case: str) -> None:
    moe = make_moe(**CASES[case])
    x = torch.randn(3, 7, D, requires_grad=True)
    out = moe(x)
    x64 = x.detach().double().requires_grad_(True)
    ref_moe = make_moe(**CASES[case]).double()
    ref_moe.load_state_dict(moe.state_dict())
    ref = reference_moe(ref_moe, x64)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref.backward(grad_out.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    ref_params = dict(ref_moe.named_parameters())
    for name, p in moe.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad.double(), ref_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_router_matches_reference_choices() -> None:
    torch.manual_seed(1)
    router = MoERouter(D, 16, 3, n_groups=4, topk_groups=2, route_scale=2.5)
    router.init_weights(0.5)
    router.e_score_correction_bias.copy_(0.2 * torch.randn(16))
    x = torch.randn(64, D)
    weights, idx, scores = router(x)
    assert weights.dtype == torch.float32 and scores.dtype == torch.float32
    dense, chosen = reference_route(
        x, router.weight, router.e_score_correction_bias, 3, 4, 2, "sigmoid", 2.5, True
    )
    got = torch.zeros(64, 16, dtype=torch.float64).scatter(1, idx, weights.double())
    assert torch.equal(got != 0, chosen)
    torch.testing.assert_close(got, dense)
    # group-limited: every token's experts lie in at most 2 of the 4 groups
    assert all(len(set(row)) <= 2 for row in (idx // 4).tolist())


def test_bias_selects_but_does_not_weight() -> None:
    torch.manual_seed(2)
    router = MoERouter(D, E, 2)
    router.init_weights(0.5)
    x = torch.randn(32, D)
    _, _, scores = router(x)
    router.e_score_correction_bias[5] = 10.0  # expert 5 is always chosen ...
    weights, idx, scores_after = router(x)
    assert (idx == 5).any(dim=1).all()
    torch.testing.assert_close(scores_after, scores)  # ... the scores ignore the bias ...
    chosen = scores.gather(1, idx)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))  # ... and weight unbiased


def test_update_bias_formula_and_counts() -> None:
    moe = make_moe()
    moe.train()
    moe(torch.randn(2, 5, D))
    assert moe.tokens_per_expert.sum() == 2 * 5 * 2
    before = moe.e_score_correction_bias.clone()
    load = torch.tensor([4.0, 0.0, 2.0, 3.0, 3.0, 1.0, 5.0, 2.0])  # mean 2.5
    moe.update_bias(load, rate=0.01)
    expected = before + 0.01 * torch.tensor([-1.0, 1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 1.0])
    torch.testing.assert_close(moe.e_score_correction_bias, expected)
    assert moe.tokens_per_expert.sum() == 0
    moe.update_bias(torch.full((E,), 3.0), rate=0.01)  # balanced load: sign(0) = 0, no change
    torch.testing.assert_close(moe.e_score_correction_bias, expected)
    moe.eval()
    moe(torch.randn(2, 5, D))
    assert moe.tokens_per_expert.sum() == 0  # counts only in training


def test_bias_is_persistent_counts_are_not() -> None:
    sd = make_moe().state_dict()
    assert "gate.e_score_correction_bias" in sd
    assert not any("tokens_per_expert" in k for k in sd)


def test_sequence_balance_loss_matches_the_report_formula() -> None:
    torch.manual_seed(3)
    batch, seq, n_exp, k, alpha = 2, 6, 4, 2, 0.1
    scores = torch.rand(batch * seq, n_exp)
    idx = scores.topk(k, dim=-1).indices
    got = sequence_balance_loss(scores, idx, batch, alpha)
    total = 0.0
    for b in range(batch):
        s = scores[b * seq : (b + 1) * seq]
        chosen = idx[b * seq : (b + 1) * seq]
        loss = 0.0
        for i in range(n_exp):
            f_i = n_exp / (k * seq) * sum(int(i in chosen[t].tolist()) for t in range(seq))
            p_i = sum(float(s[t, i] / s[t].sum()) for t in range(seq)) / seq
            loss += f_i * p_i
        total += alpha * loss
    assert math.isclose(float(got), total / batch, rel_tol=1e-5)


def test_balance_loss_has_gradient_to_the_router() -> None:
    moe = make_moe(balance_loss_alpha=0.1).train()
    moe(torch.randn(2, 5, D))
    assert moe.aux_loss is not None
    moe.aux_loss.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_experts_run_on_contiguous_slices() -> None:
    """Expert e sees exactly the tokens routed to it, as one contiguous block of the sorted copies."""
    moe = make_moe()
    seen: list[torch.Tensor] = []
    original = moe.experts.forward

    def spy(x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        seen.append(x_sorted)
        seen.append(torch.tensor(counts))
        return original(x_sorted, counts)

    moe.experts.forward = spy  # type: ignore[method-assign]
    x = torch.randn(1, 9, D)
    _, idx, _ = moe.gate(x.view(-1, D))
    moe(x)
    x_sorted, counts = seen
    start = 0
    for e in range(E):
        rows = x_sorted[start : start + int(counts[e])]
        tokens = (idx == e).any(dim=1).nonzero().flatten()
        torch.testing.assert_close(rows, x.view(-1, D)[tokens])
        start += int(counts[e])


def test_dispatcher_roundtrip() -> None:
    d = TokenDispatcher(4)
    x = torch.randn(5, 3)
    idx = torch.tensor([[0, 3], [1, 0], [2, 3], [3, 1], [0, 2]])
    xs, counts, state = d.dispatch(x, idx)
    assert counts == [3, 2, 2, 3]
    w = torch.rand(5, 2)
    torch.testing.assert_close(d.combine(xs, w, state), x * w.sum(1, keepdim=True))


@pytest.mark.parametrize("implementation", ["auto", "cpu_split", "grouped_mm", "loop"])
def test_expert_kernels_agree_with_empty_experts(implementation: str) -> None:
    moe = make_moe(n_activated_experts=1)
    with torch.no_grad():
        moe.e_score_correction_bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0]))  # experts 2..7 idle
    moe.experts.implementation = implementation
    moe.experts.min_rows_per_split = 1  # two blocks per expert GEMM even for these few rows
    moe.experts.cpu_threads = 2
    x = torch.randn(1, 6, D, dtype=torch.float32, requires_grad=True)
    out = moe(x)
    ref_moe = make_moe(n_activated_experts=1).double()
    ref_moe.load_state_dict(moe.state_dict())
    x64 = x.detach().double().requires_grad_(True)
    ref = reference_moe(ref_moe, x64)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    grad = moe.experts.gate_up_proj.grad
    assert grad is not None and grad[2:].abs().sum() == 0
    torch.testing.assert_close(grad.double(), ref_moe.experts.gate_up_proj.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["auto", "cpu_split", "grouped_mm", "loop"])
def test_empty_input(implementation: str) -> None:
    """A batch with no tokens (e.g. an empty micro-batch after filtering) gives an empty output."""
    moe = make_moe()
    moe.experts.implementation = implementation
    x = torch.zeros(2, 0, D, requires_grad=True)
    out = moe(x)
    assert out.shape == (2, 0, D)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == (2, 0, D)


@pytest.mark.parametrize("implementation", ["auto", "cpu_split", "grouped_mm", "loop"])
def test_no_rows_still_give_every_expert_weight_a_zero_gradient(implementation: str) -> None:
    """An expert-parallel rank can receive no rows: its expert weights must still get (zero)
    gradients, or ZeRO-1/2 reduce different parameters on the replicas and the ranks hang."""
    experts = make_moe().experts
    experts.implementation = implementation
    x = torch.zeros(0, D, requires_grad=True)
    experts(x, [0] * experts.n_experts).sum().backward()
    for p in (experts.gate_up_proj, experts.down_proj):
        assert p.grad is not None and p.grad.abs().sum() == 0


def _experts_step(
    experts: GroupedExperts, x: torch.Tensor, counts: list[int], grad: torch.Tensor
) -> list[torch.Tensor]:
    experts.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_(True)
    out = experts(xi, counts)
    out.backward(grad)
    grads = [p.grad for p in (xi, experts.gate_up_proj, experts.down_proj)]
    assert all(g is not None for g in grads)
    return [out.detach(), *grads]  # type: ignore[list-item]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_split_blocks_match_the_loop(threads: int) -> None:
    """Row blocks with leftovers, empty experts, and a weight-gradient dim that ``threads`` does
    not divide (2I = 10): every output and gradient equals the per-expert loop (float64)."""
    torch.manual_seed(0)
    experts = GroupedExperts(5, 12, 5).double()
    experts.init_weights(std=0.3)
    counts = [7, 0, 4, 11, 1]
    x = torch.randn(sum(counts), 12, dtype=torch.float64)
    grad = torch.randn(sum(counts), 12, dtype=torch.float64)
    experts.implementation = "loop"
    ref = _experts_step(experts, x, counts, grad)
    experts.implementation = "cpu_split"
    experts.cpu_threads, experts.min_rows_per_split = threads, 1
    got = _experts_step(experts, x, counts, grad)
    for name, a, b in zip(("out", "x", "gate_up_proj", "down_proj"), got, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)
    assert got[2][1].abs().sum() == 0 and got[3][1].abs().sum() == 0  # idle expert: zero gradient


def test_cpu_split_with_frozen_experts_gives_the_input_gradient_only() -> None:
    torch.manual_seed(0)
    experts = GroupedExperts(3, 8, 4).double()
    experts.init_weights(std=0.3)
    experts.requires_grad_(False)
    counts = [3, 5, 2]
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    experts.implementation = "cpu_split"
    experts.cpu_threads, experts.min_rows_per_split = 2, 1
    experts(x, counts).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    experts.implementation = "loop"
    experts(x_ref, counts).sum().backward()
    assert experts.gate_up_proj.grad is None
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-12, rtol=1e-12)


def test_auto_kernel_choice() -> None:
    experts = GroupedExperts(4, 16, 8)
    x32 = torch.zeros(3, 16)
    assert experts._kernel(x32) == "cpu_split"
    assert experts.double()._kernel(x32.double()) == "cpu_split"
    experts.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert experts._kernel(x32) == "grouped_mm"  # the split kernel has no autocast rules
    assert experts.bfloat16()._kernel(x32.bfloat16()) == "grouped_mm"
    odd = GroupedExperts(4, 12, 6).bfloat16()  # rows of 24 / 12 bytes: grouped_mm wants 16-byte strides
    assert odd._kernel(torch.zeros(3, 12, dtype=torch.bfloat16)) == "loop"
    experts.use_grouped_mm = False
    assert experts.implementation == "loop" and experts._kernel(x32) == "loop"
    experts.use_grouped_mm = True
    assert experts.implementation == "auto"


def test_swiglu_act_gradient_in_float64() -> None:
    """The fused SwiGLU activation (the grouped path's, one kernel each way on CUDA) has the
    analytic gradient of ``silu(gate) * up``."""
    from deepsuite.layers.moe_kernels import swiglu_act

    h = torch.randn(7, 2 * 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_act, (h,))


def test_grouped_mm_takes_counts_as_a_tensor() -> None:
    """The grouped_mm kernel reads the rows per expert from a tensor (no host list needed) and gives
    the loop's results; the other kernels accept a tensor too."""
    from deepsuite.layers.moe_kernels import grouped_mm_supported, swiglu_experts

    torch.manual_seed(0)
    counts = [3, 0, 9, 4]
    w1 = torch.randn(4, 2 * 8, 16) * 0.1
    w2 = torch.randn(4, 16, 8) * 0.1
    x = torch.randn(sum(counts), 16)
    want = swiglu_experts("loop", x, counts, w1, w2)
    kernels = ["loop", "cpu_split"] + (["grouped_mm"] if grouped_mm_supported(x) else [])
    for kernel in kernels:
        got = swiglu_experts(kernel, x, torch.tensor(counts), w1, w2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
