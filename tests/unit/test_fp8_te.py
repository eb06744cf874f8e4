"""The Transformer Engine path's conversion logic, run against a FAKE ``transformer_engine``.

MOCKED: TE cannot be installed here (no CUDA). The fake package (tests/fake_te.py) mimics the TE
API that deepsuite calls with plain high-precision PyTorch, so these tests check deepsuite's logic
only: which modules are swapped, that weights are copied, that m_splits are the tokens per expert,
which recipe is built from which config, which autocast is entered, that converted models save and
load the plain layout. Real TE runs in tests/gpu/test_te_cuda.py (skipped unless
transformer_engine imports on a GPU machine).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deepsuite.fp8 as fp8
from deepsuite.config.schema import FP8Config
from deepsuite.fp8 import te as te_path
from deepsuite.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_te import install_fake_te


@pytest.fixture
def fake_te(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return install_fake_te(monkeypatch)


def test_recipes_from_config(fake_te: dict[str, Any]) -> None:
    assert te_path.te_unavailable_reason() is None
    delayed = te_path.build_recipe(FP8Config(recipe="delayed", amax_history_len=32))
    assert type(delayed).__name__ == "DelayedScaling"
    assert delayed.kwargs["amax_history_len"] == 32 and delayed.kwargs["margin"] == 0
    assert delayed.kwargs["fp8_format"].name == "HYBRID" and delayed.kwargs["amax_compute_algo"] == "max"
    current = te_path.build_recipe(FP8Config(recipe="current"))
    assert type(current).__name__ == "Float8CurrentScaling" and current.kwargs["fp8_format"].name == "HYBRID"
    e4m3 = te_path.build_recipe(FP8Config(recipe="current", grad_dtype="e4m3"))
    assert e4m3.kwargs["fp8_format"].name == "E4M3"
    assert type(te_path.build_recipe(FP8Config(recipe="block"))).__name__ == "Float8BlockScaling"
    assert type(te_path.build_recipe(FP8Config(recipe="mxfp8"))).__name__ == "MXFP8BlockScaling"


def test_recipe_refused_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_te(monkeypatch, recipes=("DelayedScaling",))
    assert "has no Float8BlockScaling" in te_path.recipe_unsupported_reason("block")
    assert te_path.recipe_unsupported_reason("delayed") is None
    install_fake_te(monkeypatch)
    assert "MXFP8 needs Blackwell" in te_path.recipe_unsupported_reason("mxfp8")


def test_te_missing_is_reported() -> None:
    if "transformer_engine" in sys.modules:
        pytest.skip("a real transformer_engine is installed")
    reason = te_path.te_unavailable_reason()
    assert reason is not None and "not installed" in reason


@pytest.mark.parametrize("new_api", [True, False], ids=["te.autocast", "te.fp8_autocast"])
def test_autocast_uses_the_installed_api(monkeypatch: pytest.MonkeyPatch, new_api: bool) -> None:
    mods = install_fake_te(monkeypatch, new_api=new_api)
    recipe = object()
    ctx = fp8.FP8Context(backend="te", te_recipe=recipe, amax_group="dp-group")
    with ctx.autocast():
        pass
    ((name, kwargs),) = mods["calls"]
    if new_api:
        assert name == "autocast" and kwargs == {
            "enabled": True,
            "recipe": recipe,
            "amax_reduction_group": "dp-group",
        }
    else:
        assert name == "fp8_autocast" and kwargs == {
            "enabled": True,
            "fp8_recipe": recipe,
            "fp8_group": "dp-group",
        }


def test_layouts_te_does_not_support_yet_use_the_native_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Expert parallelism and activation checkpointing with TE are not built yet: a run that would
    pick TE takes the native path and says why (and an explicit fp8.backend=te says so too)."""
    monkeypatch.setattr(fp8, "_te_unusable_reason", lambda cfg, device: None)  # as if TE ran here
    device = torch.device("cpu")
    assert fp8.select_backend(FP8Config(enabled=True), device)[0] == "te"
    blockers = fp8.te_blockers_for(ep_size=2, activation_checkpointing=True)
    assert len(blockers) == 2 and fp8.te_blockers_for(1, False) == []
    for backend in ("auto", "te"):
        chosen, notes = fp8.select_backend(FP8Config(enabled=True, backend=backend), device, blockers)
        assert chosen == "native"
        assert "expert parallelism" in notes[0] and "activation checkpointing" in notes[0]


def test_prepare_fp8_te_converts_linears_and_experts(
    fake_te: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the TE backend selected, every eligible Linear becomes te.Linear (weights copied) and
    the stacked experts run on GroupedLinear with m_splits = tokens per expert: same outputs."""
    from deepsuite.fp8.experts import TEGroupedExperts

    monkeypatch.setattr(fp8, "select_backend", lambda cfg, device, blockers=(): ("te", []))
    torch.manual_seed(0)
    ref = build_model(name="deepseek_v3", flavor="deepseek-v3-debug")
    model = build_model(name="deepseek_v3", flavor="deepseek-v3-debug")
    model.load_state_dict(ref.state_dict())
    ctx = prepare_fp8(model, FP8Config(enabled=True, recipe="delayed"))
    te_linear = sys.modules["transformer_engine.pytorch"].Linear
    assert ctx.backend == "te" and type(ctx.te_recipe).__name__ == "DelayedScaling"
    assert isinstance(model.layers[0].attn.wq_a, te_linear)
    assert isinstance(model.layers[1].ffn.shared_experts.gate_proj, te_linear)
    assert not isinstance(model.mtp[0].eh_proj, te_linear)
    experts = model.layers[1].ffn.experts
    assert isinstance(experts, TEGroupedExperts)
    # the experts alone: uneven splits including an empty expert, against the stacked original
    x = torch.randn(37, 128)
    counts = [5, 0, 9, 3, 7, 1, 12, 0]
    torch.testing.assert_close(experts(x, counts), ref.layers[1].ffn.experts(x, counts))
    stacked = experts.state_dict()  # the plain layout (see the next test)
    torch.testing.assert_close(stacked["gate_up_proj"], ref.layers[1].ffn.experts.gate_up_proj)
    # the whole model, under the TE autocast
    ids = torch.randint(0, 4096, (2, 24))
    with torch.no_grad(), ctx.autocast():
        torch.testing.assert_close(model(ids), ref(ids))
    assert fake_te["calls"] and fake_te["calls"][0][0] == "autocast"


def prepare_fp8(model: nn.Module, cfg: FP8Config) -> fp8.FP8Context:
    return fp8.prepare_fp8(model, cfg)


def test_te_model_saves_and_loads_the_plain_layout(
    fake_te: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TE-converted model's state dict has exactly the plain model's keys, in its order, with its
    values (stacked experts, no TE ``_extra_state``); it loads strictly into the plain model and a
    plain state dict loads strictly into the TE model. The metadata names the parameters each
    stacked key is made of, as the optimizer knows them."""
    from deepsuite.fp8.experts import STACKED_PARAMETERS

    monkeypatch.setattr(fp8, "select_backend", lambda cfg, device, blockers=(): ("te", []))
    torch.manual_seed(0)
    plain = build_model(name="deepseek_v3", flavor="deepseek-v3-debug")
    model = build_model(name="deepseek_v3", flavor="deepseek-v3-debug")
    model.load_state_dict(plain.state_dict())
    prepare_fp8(model, FP8Config(enabled=True, recipe="delayed"))
    assert isinstance(model.layers[0].attn.wq_a, fake_te["transformer_engine.pytorch"].Linear)
    assert "_extra_state" in nn.Module.state_dict(model.layers[0].attn.wq_a.__class__(16, 16))  # TE-like
    saved = model.state_dict()
    assert list(saved) == list(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(saved[key], value), key
    stacked = saved._metadata["layers.1.ffn.experts"][STACKED_PARAMETERS]
    assert stacked["down_proj"] == [f"down.weight{e}" for e in range(8)]
    params = dict(model.named_parameters())
    assert all(f"layers.1.ffn.experts.{n}" in params for names in stacked.values() for n in names)
    # plain -> TE and TE -> plain, strictly
    torch.manual_seed(1)
    other = build_model(name="deepseek_v3", flavor="deepseek-v3-debug")
    prepare_fp8(other, FP8Config(enabled=True, recipe="delayed"))
    other.load_state_dict(plain.state_dict())
    fresh = build_model(name="deepseek_v3", flavor="deepseek-v3-debug")
    fresh.load_state_dict(other.state_dict())
    ids = torch.randint(0, 4096, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(other(ids), plain(ids))
        torch.testing.assert_close(fresh(ids), plain(ids))
