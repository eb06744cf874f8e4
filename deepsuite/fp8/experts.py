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
  ``gate_up.weight{e}`` / ``down.weight{e}``, but it saves and loads the plain layout: its state
  dict holds ``gate_up_proj`` / ``down_proj`` stacked (and no TE ``_extra_state``), and its
  state-dict metadata lists which parameters each stacked key is made of (``stacked_parameters``),
  so that the optimizer's fp32 masters, which carry the parameter names, can be stacked the same
  way when a checkpoint is consolidated.

A module is converted when its name passes ``fp8.exclude`` and D and I are multiples of 16.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsuite.fp8.native import Float8Recipe, float8_linear, scaled_matmul
from deepsuite.fp8.quant import E4M3, TENSORWISE, Float8Quantized, amax_to_scale, cast_to_fp8
from deepsuite.fp8.te import keep_extra_state_out

_ALIGN = 16
_STACKED = {"gate_up": "gate_up_proj", "down": "down_proj"}  # TE module -> the plain stacked Parameter
STACKED_PARAMETERS = "stacked_parameters"  # the state-dict metadata entry checkpoint consolidation reads


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


def _save_stacked(
    module: Any, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]
) -> None:
    """State-dict hook: each TE module's per-expert weights stacked into its plain Parameter."""
    stacked = {}
    for proj, name in _STACKED.items():
        parts = [f"{proj}.weight{e}" for e in range(module.n_experts)]
        with torch.no_grad():
            state_dict[prefix + name] = torch.stack([state_dict.pop(prefix + p) for p in parts])
        stacked[name] = parts
    local_metadata[STACKED_PARAMETERS] = stacked


def _load_stacked(module: Any, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load pre-hook: the plain stacked Parameters split into the TE modules' per-expert weights."""
    for proj, name in _STACKED.items():
        if prefix + name in state_dict:
            for e, weight in enumerate(state_dict.pop(prefix + name).unbind(0)):
                state_dict[f"{prefix}{proj}.weight{e}"] = weight


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
            new.gate_up = keep_extra_state_out(te.GroupedLinear(n, d, 2 * i, **kw))
            new.down = keep_extra_state_out(te.GroupedLinear(n, i, d, **kw))
            with torch.no_grad():
                for e in range(n):
                    getattr(new.gate_up, f"weight{e}").copy_(w_gu[e])
                    getattr(new.down, f"weight{e}").copy_(w_down[e])
            has_padding = hasattr(te, "Fp8Padding") and hasattr(te, "Fp8Unpadding")
            new.pad = te.Fp8Padding(n) if has_padding else None
            new.unpad = te.Fp8Unpadding(n) if has_padding else None
            new.train(experts.training)
            new.register_state_dict_post_hook(_save_stacked)
            new.register_load_state_dict_pre_hook(_load_stacked)
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


def convert_grouped_experts(
    model: nn.Module, backend: str, is_excluded: Any, recipe: Float8Recipe | None
) -> tuple[list[str], dict[str, str]]:
    """Replace every eligible ``GroupedExperts`` of ``model`` for ``backend`` (te or native);
    returns the names converted and the names skipped with the reason."""
    converted: list[str] = []
    skipped: dict[str, str] = {}
    if GroupedExperts is None:
        return converted, skipped
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, GroupedExperts) and not isinstance(m, (Float8GroupedExperts, TEGroupedExperts))
    ]
    for name, module in found:
        experts: Any = module
        hits = is_excluded(name)
        if hits:
            skipped[name] = f"excluded by name ({', '.join(hits)})"
        elif experts.d_model % _ALIGN or experts.d_ffn % _ALIGN:
            skipped[name] = (
                f"expert dims d_model={experts.d_model}, d_ffn={experts.d_ffn} not multiples of {_ALIGN}"
            )
        elif experts.gate_up_proj.device.type == "meta":
            skipped[name] = "on the meta device (materialise the model first)"
        else:
            if backend == "te":
                new: nn.Module = TEGroupedExperts.from_experts(experts)
            else:
                assert recipe is not None
                new = Float8GroupedExperts.from_experts(experts, recipe)
            model.set_submodule(name, new)
            converted.append(name)
    return converted, skipped
