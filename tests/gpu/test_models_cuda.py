"""The model families on CUDA in bf16, and flash-attn against SDPA when installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.gpu


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _flavor_or_skip(name: str, flavor: str) -> None:
    from deepsuite.config.errors import ConfigError
    from deepsuite.config.families import get_family

    try:
        flavors = get_family(name).flavors
    except (ConfigError, ImportError) as err:
        pytest.skip(f"model family {name!r} is not available yet: {err}")
    if flavor not in flavors:
        pytest.skip(f"flavor {flavor!r} of {name!r} is not defined yet")


@pytest.mark.parametrize(("name", "flavor"), [("gpt", "gpt2-debug"), ("deepseek_v3", "deepseek-v3-debug")])
def test_forward_bf16_cuda_matches_fp32_cpu(name: str, flavor: str) -> None:
    """bf16 autocast on CUDA gives the fp32 CPU logits within bf16 error, and the loss trains."""
    _flavor_or_skip(name, flavor)
    from deepsuite.models import build_model

    torch.manual_seed(0)
    model = build_model(name=name, flavor=flavor, device="cpu").eval()
    ids = torch.randint(0, model.args.vocab_size, (2, 32))
    with torch.no_grad():
        ref = model(ids)
        model.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids.cuda())
    assert out.shape == ref.shape
    # bf16 rounding, and for DeepSeek-V3 the odd top-k routing decision flipped by it
    assert _rel(out.float().cpu(), ref) < 6e-2
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids.cuda(), labels=ids.roll(-1, 1).cuda()).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attention_matches_sdpa() -> None:
    from deepsuite.layers.attention.backend import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flash = attention(q, k, v, causal=True, backend="flash")
    sdpa = attention(q, k, v, causal=True, backend="sdpa")
    assert _rel(flash.float(), sdpa.float()) < 1e-2


def test_experts_under_cuda_autocast_run_grouped_mm_and_match_the_loop() -> None:
    """fp32 master experts under bf16 autocast take the grouped_mm kernel; outputs and grads
    equal the per-expert loop (which autocast casts the same way) within bf16 error."""
    from deepsuite.layers.moe import GroupedExperts
    from deepsuite.layers.moe_kernels import grouped_mm_supported

    probe = torch.empty(0, device="cuda", dtype=torch.bfloat16)
    if not grouped_mm_supported(probe):
        pytest.skip(f"torch {torch.__version__} has no CUDA bf16 grouped_mm on this GPU")
    torch.manual_seed(0)
    experts = GroupedExperts(8, 256, 128).cuda()
    experts.init_weights(0.05)
    counts = [37, 0, 120, 5, 64, 1, 200, 85]  # an empty expert and a 1-row one
    x = torch.randn(sum(counts), 256, device="cuda", requires_grad=True)
    results = {}
    for kernel in ("grouped_mm", "loop"):
        experts.implementation = "auto" if kernel == "grouped_mm" else "loop"
        x.grad = None
        experts.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if kernel == "grouped_mm":
                assert experts._kernel(x) == "grouped_mm"
            out = experts(x, counts)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        results[kernel] = (
            out.float(),
            x.grad.clone(),
            experts.gate_up_proj.grad.clone(),
            experts.down_proj.grad.clone(),
        )
    for got, ref in zip(results["grouped_mm"], results["loop"]):
        assert _rel(got, ref) < 2e-2
