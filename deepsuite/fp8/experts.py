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
  of one module, `stack_te_expert_state_dict` that of a whole state dict (checkpoint
  consolidation), and `te_expert_stack_plan` the key mapping alone.

A module is converted when its name passes ``fp8.exclude`` and D and I are multiples of 16.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsuite.config.schema import FP8Config
from deepsuite.fp8.native import Float8Recipe, float8_linear, scaled_matmul
from deepsuite.fp8.quant import E4M3, TENSORWISE, Float8Quantized, amax_to_scale, cast_to_fp8

if TYPE_CHECKING:
    from deepsuite.fp8 import FP8Context

_ALIGN = 16

# ``<prefix>gate_up.weight{e}`` / ``<prefix>down.weight{e}``: TEGroupedExperts' per-expert weights
_TE_EXPERT_KEY = re.compile(r"^(?P<prefix>(?:.+\.)?)(?P<proj>gate_up|down)\.weight(?P<e>\d+)$")
_STACKED_NAME = {"gate_up": "gate_up_proj", "down": "down_proj"}
EXTRA_STATE_SUFFIX = "_extra_state"


def is_extra_state_key(key: str) -> bool:
    """Whether ``key`` is a module's ``get_extra_state`` entry (Transformer Engine's FP8 metadata),
    which the plain model does not have."""
    return key == EXTRA_STATE_SUFFIX or key.endswith("." + EXTRA_STATE_SUFFIX)


def te_expert_stack_plan(keys: Iterable[str]) -> dict[str, list[str]]:
    """``{stacked key: [per-expert keys, expert 0 first]}`` for the `TEGroupedExperts` weights in ``keys``.

    ``<prefix>gate_up.weight{e}`` (``[2I, D]`` each) become ``<prefix>gate_up_proj`` ``[E, 2I, D]``
    and ``<prefix>down.weight{e}`` (``[D, I]``) become ``<prefix>down_proj`` ``[E, D, I]``: the layout
    of ``GroupedExperts``. A prefix counts only when it has both projections with the same experts
    ``0 … E-1`` and no stacked key of its own, so an unrelated ``down.weight0`` is left alone.
    """
    keys = list(keys)
    present = set(keys)
    found: dict[str, dict[str, dict[int, str]]] = {}
    for key in keys:
        m = _TE_EXPERT_KEY.match(key)
        if m:
            found.setdefault(m["prefix"], {}).setdefault(m["proj"], {})[int(m["e"])] = key
    plan: dict[str, list[str]] = {}
    for prefix, projs in found.items():
        if set(projs) != set(_STACKED_NAME):
            continue
        experts = {proj: sorted(idx) for proj, idx in projs.items()}
        n = len(experts["gate_up"])
        if any(idx != list(range(n)) for idx in experts.values()):
            continue
        stacked = {proj: prefix + name for proj, name in _STACKED_NAME.items()}
        if any(name in present for name in stacked.values()):
            continue
        for proj, name in stacked.items():
            plan[name] = [projs[proj][e] for e in range(n)]
    return plan


def stack_te_expert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` in the plain model's layout: `TEGroupedExperts` weights stacked back into
    ``gate_up_proj`` / ``down_proj`` (see `te_expert_stack_plan`) and every ``_extra_state`` entry
    dropped. Other entries are kept as they are, in their order; without TE keys it is a copy."""
    plan = te_expert_stack_plan(state_dict)
    first_of = {parts[0]: stacked for stacked, parts in plan.items()}
    consumed = {k for parts in plan.values() for k in parts}
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if is_extra_state_key(key):
            continue
        if key in first_of:
            name = first_of[key]
            out[name] = torch.stack([state_dict[k] for k in plan[name]])
        elif key not in consumed:
            out[key] = value
    return out


def _quantize_per_expert(w: torch.Tensor, recipe: Float8Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 data ``[E, R, C]`` and one scale per expert ``[E]`` (tensorwise within each expert),
    each from one pass over the stacked weights."""
    n_experts = w.shape[0]
    amax = torch.linalg.vector_norm(w.detach().reshape(n_experts, -1), ord=float("inf"), dim=1)
    scale = amax_to_scale(amax, E4M3, margin=recipe.margin, power_of_two=recipe.power_of_two_scales)
    return cast_to_fp8(w.detach(), scale.view(n_experts, 1, 1), E4M3), scale


def _rows(q: Float8Quantized, start: int, n: int) -> Float8Quantized:
    """Rows ``start … start + n`` of a tensorwise-quantised ``q`` (same scale)."""
    data = q.data[start : start + n]
    return Float8Quantized(data, q.scale, tuple(data.shape))  # type: ignore[arg-type]


def _rows_t(q: Float8Quantized, start: int, n: int) -> Float8Quantized:
    """Rows ``start … start + n`` of a tensorwise-quantised ``q``, transposed and contiguous."""
    data = q.data[start : start + n].t().contiguous()
    return Float8Quantized(data, q.scale, tuple(data.shape))  # type: ignore[arg-type]


def _expert(data: torch.Tensor, scale: torch.Tensor, e: int) -> Float8Quantized:
    return Float8Quantized(data[e], scale[e].reshape(1, 1), tuple(data.shape[1:]))  # type: ignore[arg-type]


class _Float8ExpertsMLP(torch.autograd.Function):
    """All routed experts' SwiGLU MLPs in FP8 with tensorwise scales, quantising each tensor once.

    The token copies (``x``, the gated activation, and in backward the two gradients) get one
    scale for all experts, each expert's weights one scale of their own; every expert then runs
    only its ``_scaled_mm`` calls on row slices (forward 2, backward 4), and the elementwise work
    (quantisation, SiLU·up and its derivative) is done once over all ``S`` rows instead of once
    per expert. The per-expert loop over `float8_linear` launched ~20 small kernels per expert
    and ran at 0.2× bf16 on an H200 (tools/benchmarks/results/mfu_NVIDIA_H200.json).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,  # (S, D), rows grouped by expert
        w_gate_up: torch.Tensor,  # [E, 2I, D]
        w_down: torch.Tensor,  # [E, D, I]
        counts: tuple[int, ...],
        recipe: Float8Recipe,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        xq = recipe.quantize(x, TENSORWISE, E4M3)
        w1, s1 = _quantize_per_expert(w_gate_up, recipe)
        w2, s2 = _quantize_per_expert(w_down, recipe)
        starts = [0, *itertools.accumulate(counts)][:-1]  # first row of each expert
        live = [e for e, n in enumerate(counts) if n]
        h = torch.cat(
            [scaled_matmul(_rows(xq, starts[e], counts[e]), _expert(w1, s1, e), out_dtype) for e in live]
        )  # (S, 2I)
        gate, up = h.chunk(2, dim=-1)
        aq = recipe.quantize(F.silu(gate) * up, TENSORWISE, E4M3)  # (S, I)
        y = torch.cat(
            [scaled_matmul(_rows(aq, starts[e], counts[e]), _expert(w2, s2, e), out_dtype) for e in live]
        )  # (S, D)
        ctx.save_for_backward(xq.data, xq.scale, w1, s1, w2, s2, h, aq.data, aq.scale)
        ctx.counts, ctx.starts, ctx.live, ctx.recipe = counts, starts, live, recipe
        ctx.dtypes = (x.dtype, w_gate_up.dtype, w_down.dtype)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x_data, x_scale, w1, s1, w2, s2, h, a_data, a_scale = ctx.saved_tensors
        counts, starts, live, recipe = ctx.counts, ctx.starts, ctx.live, ctx.recipe
        x_dtype, w1_dtype, w2_dtype = ctx.dtypes
        xq = Float8Quantized(x_data, x_scale, tuple(x_data.shape))
        aq = Float8Quantized(a_data, a_scale, tuple(a_data.shape))
        gq = recipe.quantize(grad_y.contiguous(), TENSORWISE, recipe.grad_dtype)  # (S, D)
        w2_t = w2.transpose(1, 2).contiguous()  # [E, I, D]: the down-projection's dgrad operand
        grad_w2 = torch.zeros(w2.shape, dtype=w2_dtype, device=w2.device)
        d_a = []
        for e in live:
            s, n = starts[e], counts[e]
            d_a.append(scaled_matmul(_rows(gq, s, n), _expert(w2_t, s2, e), torch.float32))  # (n, I)
            grad_w2[e] = scaled_matmul(_rows_t(gq, s, n), _rows_t(aq, s, n), torch.float32)  # (D, I)
        da = torch.cat(d_a)  # (S, I)
        gate, up = h.float().chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        d_gate = da * up * sig * (1 + gate * (1 - sig))
        dhq = recipe.quantize(torch.cat([d_gate, da * gate * sig], dim=-1), TENSORWISE, recipe.grad_dtype)
        w1_t = w1.transpose(1, 2).contiguous()  # [E, D, 2I]
        grad_w1 = torch.zeros(w1.shape, dtype=w1_dtype, device=w1.device)
        d_x = []
        for e in live:
            s, n = starts[e], counts[e]
            d_x.append(scaled_matmul(_rows(dhq, s, n), _expert(w1_t, s1, e), x_dtype))  # (n, D)
            grad_w1[e] = scaled_matmul(_rows_t(dhq, s, n), _rows_t(xq, s, n), torch.float32)  # (2I, D)
        return torch.cat(d_x), grad_w1, grad_w2, None, None, None


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
            if self.recipe.scaling == "tensorwise" and x_sorted.shape[0] > 0:
                device_type = x_sorted.device.type
                out_dtype = (
                    torch.get_autocast_dtype(device_type)
                    if torch.is_autocast_enabled(device_type)
                    else x_sorted.dtype
                )
                return _Float8ExpertsMLP.apply(
                    x_sorted.contiguous(),
                    self.gate_up_proj,
                    self.down_proj,
                    tuple(counts),
                    self.recipe,
                    out_dtype,
                )
            outputs = []
            # rowwise / block scaling: each expert through float8_linear. split and unbind: the
            # backward writes each expert's gradient slice once (slicing or indexing [e] would
            # materialise a full-size zero gradient per expert)
            slices = x_sorted.split(list(counts))
            for xe, w_gate_up, w_down in zip(slices, self.gate_up_proj.unbind(0), self.down_proj.unbind(0)):
                if xe.shape[0] == 0:
                    continue
                gate, up = float8_linear(xe, w_gate_up, None, self.recipe).chunk(2, dim=-1)  # (n, I) each
                outputs.append(float8_linear(F.silu(gate) * up, w_down, None, self.recipe))  # (n, D)
            if not outputs:
                # no rows here (possible under EP): zero gradients for every weight, as the plain
                # experts give, so every replica's expert gradient hooks fire alike
                weights_sum = self.gate_up_proj.sum() + self.down_proj.sum()
                return x_sorted.new_zeros(0, self.d_model) + 0 * (x_sorted.sum() + weights_sum)
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
