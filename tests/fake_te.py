"""A FAKE ``transformer_engine`` for tests on machines without TE (no CUDA).

It mimics the TE API that deepsuite calls (``te.Linear``, ``te.GroupedLinear`` with ``m_splits``,
``te.Fp8Padding`` / ``te.Fp8Unpadding``, ``te.autocast`` / ``te.fp8_autocast``, ``te.is_*_available``
and the recipe classes) with plain high-precision PyTorch. Like TE's, its modules keep "extra state"
(TE's pickled FP8 scaling metadata, saved under ``_extra_state`` by ``nn.Module.state_dict``).
Install it with `install_fake_te`.
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

RECIPES = ("DelayedScaling", "Float8CurrentScaling", "Float8BlockScaling", "MXFP8BlockScaling")


def fake_te_modules(
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

    class ExtraState:
        """TE's FP8 metadata hooks: a uint8 blob out, and None (nothing saved) accepted back."""

        def get_extra_state(self) -> torch.Tensor:
            return torch.zeros(8, dtype=torch.uint8)

        def set_extra_state(self, state: Any) -> None:
            if state is not None:
                self.loaded_extra_state = state

    class Linear(ExtraState, nn.Linear):
        def __init__(self, i: int, o: int, bias: bool = True, params_dtype: Any = None, device: Any = None):
            super().__init__(i, o, bias=bias, dtype=params_dtype, device=device)

    class GroupedLinear(ExtraState, nn.Module):
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


def install_fake_te(monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> dict[str, Any]:
    """Put a fake TE (`fake_te_modules` with ``kwargs``) into ``sys.modules`` for one test; returns
    its modules and ``calls``."""
    mods = fake_te_modules(**kwargs)
    for name, mod in mods.items():
        if name != "calls":
            monkeypatch.setitem(sys.modules, name, mod)
    return mods
