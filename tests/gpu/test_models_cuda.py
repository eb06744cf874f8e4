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
    from deepsuite.config.loader import family_module

    try:
        flavors = family_module(name).FLAVORS
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
