"""The Transformer Engine path's conversion logic, run against a FAKE ``transformer_engine``.

MOCKED: TE cannot be installed here (no CUDA). The fake package below mimics the TE API that
deepsuite calls (``te.Linear``, ``te.GroupedLinear`` with ``m_splits``, ``te.Fp8Padding`` /
``te.Fp8Unpadding``, ``te.autocast`` / ``te.fp8_autocast``, ``te.is_*_available`` and the recipe
classes) with plain high-precision PyTorch, so these tests check deepsuite's logic only: which
modules are swapped, that weights are copied, that m_splits are the tokens per expert, which
recipe is built from which config, which autocast is entered. Real TE runs in
tests/gpu/test_te_cuda.py (skipped unless transformer_engine imports on a GPU machine).
"""

from __future__ import annotations

import contextlib
import enum
import importlib.machinery
import sys
import types
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deepsuite.fp8 as fp8
from deepsuite.config.schema import FP8Config
from deepsuite.fp8 import te as te_path
from deepsuite.models import build_model

RECIPES = ("DelayedScaling", "Float8CurrentScaling", "Float8BlockScaling", "MXFP8BlockScaling")


def _fake_te(
    new_api: bool = True, recipes: tuple[str, ...] = RECIPES, mxfp8_ok: bool = False
) -> dict[str, Any]:
    """Modules of a fake transformer_engine; ``calls`` records autocast entries."""
    calls: list[tuple[str, dict[str, Any]]] = []
    root = types.ModuleType("transformer_engine")
    root.__spec__ = importlib.machinery.ModuleSpec("transformer_engine", None)
    root.__version__ = "0.0-fake"
    pt = types.ModuleType("transformer_engine.pytorch")
    pt.__spec__ = importlib.machinery.ModuleSpec("transformer_engine.pytorch", None)
    common = types.ModuleType("transformer_engine.common")
    recipe = types.ModuleType("transformer_engine.common.recipe")

    class Format(enum.Enum):
        E4M3 = "E4M3"
        HYBRID = "HYBRID"

    recipe.Format = Format
    for name in recipes:
        recipe.__dict__[name] = type(name, (), {"__init__": lambda self, **kw: setattr(self, "kwargs", kw)})

    class Linear(nn.Linear):
        def __init__(self, i: int, o: int, bias: bool = True, params_dtype: Any = None, device: Any = None):
            super().__init__(i, o, bias=bias, dtype=params_dtype, device=device)

    class GroupedLinear(nn.Module):
        def __init__(
            self, n: int, i: int, o: int, bias: bool = False, params_dtype: Any = None, device: Any = None
        ):
            super().__init__()
            for e in range(n):
                self.register_parameter(
                    f"weight{e}", nn.Parameter(torch.empty(o, i, dtype=params_dtype, device=device))
                )
            self.n = n

        def forward(self, inp: torch.Tensor, m_splits: list[int]) -> torch.Tensor:
            assert len(m_splits) == self.n and sum(m_splits) == inp.shape[0]
            parts = inp.split(m_splits)
            return torch.cat([F.linear(p, getattr(self, f"weight{e}")) for e, p in enumerate(parts)])

    class Fp8Padding(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()

        def forward(self, inp: torch.Tensor, m_splits: list[int]) -> tuple[torch.Tensor, list[int]]:
            padded = [-(-m // 16) * 16 for m in m_splits]
            parts = [F.pad(p, (0, 0, 0, q - m)) for p, m, q in zip(inp.split(m_splits), m_splits, padded)]
            return torch.cat(parts), padded

    class Fp8Unpadding(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()

        def forward(self, inp: torch.Tensor, m_splits: list[int]) -> torch.Tensor:
            padded = [-(-m // 16) * 16 for m in m_splits]
            return torch.cat([p[:m] for p, m in zip(inp.split(padded), m_splits)])

    @contextlib.contextmanager
    def autocast(**kw: Any):
        calls.append(("autocast", kw))
        yield

    @contextlib.contextmanager
    def fp8_autocast(**kw: Any):
        calls.append(("fp8_autocast", kw))
        yield

    pt.Linear, pt.GroupedLinear, pt.Fp8Padding, pt.Fp8Unpadding = (
        Linear,
        GroupedLinear,
        Fp8Padding,
        Fp8Unpadding,
    )
    if new_api:
        pt.autocast = autocast
    pt.fp8_autocast = fp8_autocast
    pt.is_fp8_available = lambda return_reason=False: (True, "") if return_reason else True
    pt.is_fp8_block_scaling_available = lambda return_reason=False: (True, "")
    pt.is_mxfp8_available = lambda return_reason=False: (
        mxfp8_ok,
        "" if mxfp8_ok else "MXFP8 needs Blackwell",
    )
    root.pytorch, root.common, common.recipe = pt, common, recipe
    return {
        "transformer_engine": root,
        "transformer_engine.pytorch": pt,
        "transformer_engine.common": common,
        "transformer_engine.common.recipe": recipe,
        "calls": calls,
    }


@pytest.fixture
def fake_te(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    mods = _fake_te()
    for name, mod in mods.items():
        if name != "calls":
            monkeypatch.setitem(sys.modules, name, mod)
    return mods


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
    mods = _fake_te(recipes=("DelayedScaling",))
    for name, mod in mods.items():
        if name != "calls":
            monkeypatch.setitem(sys.modules, name, mod)
    assert "has no Float8BlockScaling" in te_path.recipe_unsupported_reason("block")
    assert te_path.recipe_unsupported_reason("delayed") is None
    mods = _fake_te()
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", mods["transformer_engine.pytorch"])
    monkeypatch.setitem(
        sys.modules, "transformer_engine.common.recipe", mods["transformer_engine.common.recipe"]
    )
    assert "MXFP8 needs Blackwell" in te_path.recipe_unsupported_reason("mxfp8")


def test_te_missing_is_reported() -> None:
    if "transformer_engine" in sys.modules:
        pytest.skip("a real transformer_engine is installed")
    reason = te_path.te_unavailable_reason()
    assert reason is not None and "not installed" in reason


@pytest.mark.parametrize("new_api", [True, False], ids=["te.autocast", "te.fp8_autocast"])
def test_autocast_uses_the_installed_api(monkeypatch: pytest.MonkeyPatch, new_api: bool) -> None:
    mods = _fake_te(new_api=new_api)
    for name, mod in mods.items():
        if name != "calls":
            monkeypatch.setitem(sys.modules, name, mod)
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
    stacked = experts.to_stacked_state_dict()
    torch.testing.assert_close(stacked["gate_up_proj"], ref.layers[1].ffn.experts.gate_up_proj)
    # the whole model, under the TE autocast
    ids = torch.randint(0, 4096, (2, 24))
    with torch.no_grad(), ctx.autocast():
        torch.testing.assert_close(model(ids), ref(ids))
    assert fake_te["calls"] and fake_te["calls"][0][0] == "autocast"


def prepare_fp8(model: nn.Module, cfg: FP8Config) -> fp8.FP8Context:
    return fp8.prepare_fp8(model, cfg)
