"""FP8 for the stacked routed experts (``deepsuite.layers.moe.GroupedExperts``).

``GroupedExperts`` keeps ``gate_up_proj [E, 2I, D]`` and ``down_proj [E, D, I]`` and runs expert
``e`` on its contiguous slice of the expert-sorted tokens (``forward(x_sorted, counts)``). Two
replacements with the same forward signature (both subclasses, so ``isinstance`` checks in
``deepsuite.parallel`` still hold):

* `Float8GroupedExperts` (native): the very same Parameters, each expert's two matmuls through
  `float8_linear` (FP8 forward, dgrad and wgrad);
* `TEGroupedExperts` (Transformer Engine): two ``te.GroupedLinear`` (``num_gemms = E``) with the
  weights copied, called with ``m_splits = counts``; token groups are padded to TE's FP8 alignment
  with ``te.Fp8Padding`` / ``te.Fp8Unpadding`` when the installed TE has them. Its parameters are
  ``gate_up.weight{e}`` / ``down.weight{e}``: `to_stacked_state_dict` gives back the stacked layout
  for checkpoints.

A module is converted when its name passes ``fp8.exclude`` and D and I are multiples of 16.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsuite.config.schema import FP8Config
from deepsuite.fp8.native import Float8Recipe, float8_linear

if TYPE_CHECKING:
    from deepsuite.fp8 import FP8Context

_ALIGN = 16


def _grouped_experts_cls() -> type[nn.Module] | None:
    if importlib.util.find_spec("deepsuite.layers.moe") is None:
        return None
    from deepsuite.layers.moe import GroupedExperts

    return GroupedExperts


GroupedExperts = _grouped_experts_cls()


if GroupedExperts is not None:

    class Float8GroupedExperts(GroupedExperts):  # type: ignore[misc,valid-type]
        """``GroupedExperts`` whose per-expert matmuls run in FP8 (native path)."""

        recipe: Float8Recipe

        @classmethod
        def from_experts(cls, experts: Any, recipe: Float8Recipe) -> Float8GroupedExperts:
            """Share ``experts``' Parameters (no copy)."""
            new = cls.__new__(cls)
            nn.Module.__init__(new)
            new.n_experts, new.d_model, new.d_ffn = experts.n_experts, experts.d_model, experts.d_ffn
            new.gate_up_proj = experts.gate_up_proj
            new.down_proj = experts.down_proj
            new.recipe = recipe
            new.train(experts.training)
            return new

        def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
            """``x_sorted`` ``(S, D)`` grouped by expert, ``counts[e]`` rows each; returns ``(S, D)``."""
            outputs = []
            # split and unbind: the backward writes each expert's gradient slice once (slicing or
            # indexing [e] would materialise a full-size zero gradient per expert)
            slices = x_sorted.split(list(counts))
            for xe, w_gate_up, w_down in zip(slices, self.gate_up_proj.unbind(0), self.down_proj.unbind(0)):
                if xe.shape[0] == 0:
                    continue
                gate, up = float8_linear(xe, w_gate_up, None, self.recipe).chunk(2, dim=-1)  # (n, I) each
                outputs.append(float8_linear(F.silu(gate) * up, w_down, None, self.recipe))  # (n, D)
            if not outputs:
                return x_sorted.new_zeros(0, self.d_model) + 0 * x_sorted.sum()
            return torch.cat(outputs, dim=0)  # (S, D)

        def extra_repr(self) -> str:
            return f"n_experts={self.n_experts}, d_model={self.d_model}, d_ffn={self.d_ffn}, scaling={self.recipe.scaling}"

    class TEGroupedExperts(GroupedExperts):  # type: ignore[misc,valid-type]
        """``GroupedExperts`` on two ``te.GroupedLinear`` (Transformer Engine path)."""

        @classmethod
        def from_experts(cls, experts: Any) -> TEGroupedExperts:
            """New TE modules with ``experts``' weights copied (build the optimizer afterwards)."""
            te = importlib.import_module("transformer_engine.pytorch")
            new = cls.__new__(cls)
            nn.Module.__init__(new)
            n, d, i = experts.n_experts, experts.d_model, experts.d_ffn
            new.n_experts, new.d_model, new.d_ffn = n, d, i
            w_gu, w_down = experts.gate_up_proj, experts.down_proj  # [E, 2I, D], [E, D, I]
            kw: dict[str, Any] = {"bias": False, "params_dtype": w_gu.dtype, "device": w_gu.device}
            new.gate_up = te.GroupedLinear(n, d, 2 * i, **kw)
            new.down = te.GroupedLinear(n, i, d, **kw)
            with torch.no_grad():
                for e in range(n):
                    getattr(new.gate_up, f"weight{e}").copy_(w_gu[e])
                    getattr(new.down, f"weight{e}").copy_(w_down[e])
            has_padding = hasattr(te, "Fp8Padding") and hasattr(te, "Fp8Unpadding")
            new.pad = te.Fp8Padding(n) if has_padding else None
            new.unpad = te.Fp8Unpadding(n) if has_padding else None
            new.train(experts.training)
            return new

        def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
            """``x_sorted`` ``(S, D)`` grouped by expert, ``counts[e]`` rows each; returns ``(S, D)``."""
            splits = list(counts)
            x = x_sorted
            if self.pad is not None:
                x, splits = self.pad(x_sorted, splits)  # each group padded to the FP8 GEMM alignment
            gate, up = self.gate_up(x, m_splits=splits).chunk(2, dim=-1)  # (S', I) each
            y = self.down(F.silu(gate) * up, m_splits=splits)  # (S', D)
            if self.unpad is not None:
                y = self.unpad(y, list(counts))
            return y

        @torch.no_grad()
        def init_weights(self, std: float = 0.02) -> None:
            """Normal(0, std) weights."""
            for e in range(self.n_experts):
                nn.init.normal_(getattr(self.gate_up, f"weight{e}"), mean=0.0, std=std)
                nn.init.normal_(getattr(self.down, f"weight{e}"), mean=0.0, std=std)

        def to_stacked_state_dict(self) -> dict[str, torch.Tensor]:
            """``{"gate_up_proj": [E, 2I, D], "down_proj": [E, D, I]}`` (the plain layout)."""
            return {
                "gate_up_proj": torch.stack(
                    [getattr(self.gate_up, f"weight{e}") for e in range(self.n_experts)]
                ),
                "down_proj": torch.stack([getattr(self.down, f"weight{e}") for e in range(self.n_experts)]),
            }


def convert_grouped_experts(
    model: nn.Module, ctx: FP8Context, cfg: FP8Config, is_excluded: Any, recipe: Float8Recipe | None
) -> None:
    """Replace every eligible ``GroupedExperts`` of ``model`` for ``ctx.backend`` (te or native)."""
    if GroupedExperts is None:
        return
    from deepsuite.fp8 import _set_submodule

    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, GroupedExperts) and not isinstance(m, (Float8GroupedExperts, TEGroupedExperts))
    ]
    for name, module in found:
        experts: Any = module
        hits = is_excluded(name)
        if hits:
            ctx.skipped[name] = f"excluded by name ({', '.join(hits)})"
            continue
        if experts.d_model % _ALIGN or experts.d_ffn % _ALIGN:
            ctx.skipped[name] = (
                f"expert dims d_model={experts.d_model}, d_ffn={experts.d_ffn} not multiples of {_ALIGN}"
            )
            continue
        if experts.gate_up_proj.device.type == "meta":
            ctx.skipped[name] = "on the meta device (materialise the model first)"
            continue
        if ctx.backend == "te":
            new: nn.Module = TEGroupedExperts.from_experts(experts)
        else:
            assert recipe is not None
            new = Float8GroupedExperts.from_experts(experts, recipe)
        _set_submodule(model, name, new)
        ctx.converted.append(name)
