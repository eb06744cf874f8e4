"""FP8 for the stacked routed experts (``deepsuite.layers.moe.GroupedExperts``).

``GroupedExperts`` keeps ``gate_up_proj [E, 2I, D]`` and ``down_proj [E, D, I]`` and runs expert
``e`` on its contiguous slice of the expert-sorted tokens (``forward(x_sorted, counts)``). Two
replacements with the same forward signature (both subclasses, so ``isinstance`` checks in
``deepsuite.parallel`` still hold):

* `Float8GroupedExperts` (native): the very same Parameters. On CUDA GPUs whose PyTorch has
  ``torch._scaled_grouped_mm`` (Hopper), all experts' forward and dgrad GEMMs are two grouped FP8
  GEMMs each way with rowwise e4m3 scales (the granularity that kernel takes, whatever the recipe
  says for dense layers), the weight gradients one bf16 grouped GEMM per projection
  (`_Float8GroupedMLP`); elsewhere each expert's matmuls go through `_scaled_mm` with the recipe's
  scaling (`_Float8ExpertsMLP` for tensorwise, `float8_linear` per expert otherwise);
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
import itertools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsuite.fp8.native import Float8Recipe, float8_linear, scaled_matmul
from deepsuite.fp8.quant import E4M3, TENSORWISE, Float8Quantized, amax_to_scale, cast_to_fp8, fp8_max
from deepsuite.fp8.te import keep_extra_state_out
from deepsuite.layers.moe import GroupedExperts
from deepsuite.layers.moe_kernels import (
    Counts,
    fused_elementwise,
    group_offsets,
    host_counts,
    silu_mul,
    silu_mul_backward,
)

logger = logging.getLogger(__name__)

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


def _rowwise_e4m3(x: torch.Tensor, margin: int, power_of_two: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``(R, K)`` as e4m3 with one scale per row: the data and the dequantisation factors
    ``(R,)`` (what ``torch._scaled_grouped_mm`` multiplies by)."""
    m = fp8_max(E4M3)
    amax = x.detach().abs().amax(dim=-1).float().clamp(min=1e-12)
    scale = m / amax / (2.0**margin)
    if power_of_two:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    data = (x.detach().float() * scale[:, None]).clamp(-m, m).to(E4M3)
    return data, scale.reciprocal()


def _quantize_rows(x: torch.Tensor, recipe: Float8Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Rowwise e4m3 of the 2-D ``x`` (a fused kernel on CUDA)."""
    return fused_elementwise(_rowwise_e4m3, x.contiguous(), recipe.margin, recipe.power_of_two_scales)


def _quantize_experts(w: torch.Tensor, recipe: Float8Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked weights ``[E, N, K]``, each row quantised along K: data ``[E, K, N]`` column-major
    (the grouped GEMM's second operand) and scales ``[E, N]``."""
    n_experts, n, k = w.shape
    data, scale = _quantize_rows(w.reshape(n_experts * n, k), recipe)
    return data.view(n_experts, n, k).transpose(-2, -1), scale.view(n_experts, n)


def _scaled_grouped(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, offs: torch.Tensor
) -> torch.Tensor:
    """``out[rows of g] = (a · a_scale)[rows of g] @ (b[g] · b_scale[g])`` in bf16: ``a`` ``(S, K)``
    e4m3 row-major, ``b`` ``[E, K, N]`` e4m3 column-major, ``offs`` the groups' end rows. CUDA:
    ``torch._scaled_grouped_mm``; elsewhere the same products in fp32, one group at a time."""
    if a.is_cuda:
        return torch._scaled_grouped_mm(a, b, a_scale, b_scale, offs=offs, out_dtype=torch.bfloat16)
    out = a.new_empty(a.shape[0], b.shape[-1], dtype=torch.bfloat16)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            lhs = a[start:end].float() * a_scale[start:end, None]
            out[start:end] = (lhs @ (b[g].float() * b_scale[g][None, :])).to(torch.bfloat16)
        start = end
    return out


def _grouped_wgrad(grad_t: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``out[g] = grad_t[:, rows of g] @ x[rows of g]`` ``[E, N, K]`` (bf16 grouped GEMM); experts
    with no rows get exact zeros."""
    n_experts = offs.shape[0]
    if x.is_cuda:
        out = F.grouped_mm(grad_t, x, offs=offs)
    else:
        out = x.new_zeros(n_experts, grad_t.shape[0], x.shape[1])
        start = 0
        for g, end in enumerate(offs.tolist()):
            if end > start:
                out[g] = grad_t[:, start:end].float() @ x[start:end].float()
            start = end
    rows = torch.diff(offs, prepend=offs.new_zeros(1))
    return torch.where((rows > 0)[:, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


class _Float8GroupedMLP(torch.autograd.Function):
    """All routed experts' SwiGLU MLPs with grouped FP8 GEMMs (rowwise e4m3 scales).

    Forward ``h = x W_gate_upᵀ``, ``a = silu(h_gate) ⊙ h_up``, ``y = a W_downᵀ`` and the two dgrad
    GEMMs of backward each run as ONE grouped FP8 GEMM over all experts: activations and gradients
    quantised per row (token), weights per output row (forward) and per input column (dgrad,
    from the transposed weights). The weight gradients are bf16 grouped GEMMs: the FP8 kernel
    for a contraction over the token groups needs each group padded to 16 rows. Counts stay on
    the device (no host sync).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,  # (S, D), rows grouped by expert
        w_gate_up: torch.Tensor,  # [E, 2I, D]
        w_down: torch.Tensor,  # [E, D, I]
        offs: torch.Tensor,  # (E,) int32 end rows
        recipe: Float8Recipe,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        xq, xs = _quantize_rows(xb, recipe)
        w1q, w1s = _quantize_experts(w_gate_up, recipe)  # [E, D, 2I] column-major
        h = _scaled_grouped(xq, xs, w1q, w1s, offs)  # (S, 2I)
        act = fused_elementwise(silu_mul, h)  # (S, I)
        aq, a_s = _quantize_rows(act, recipe)
        w2q, w2s = _quantize_experts(w_down, recipe)  # [E, I, D] column-major
        y = _scaled_grouped(aq, a_s, w2q, w2s, offs)  # (S, D)
        ctx.save_for_backward(xb, h, act, offs, w_gate_up, w_down)
        ctx.recipe = recipe
        ctx.x_dtype = x.dtype
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        xb, h, act, offs, w_gate_up, w_down = ctx.saved_tensors
        recipe = ctx.recipe
        gy = grad_y.contiguous().to(torch.bfloat16)  # (S, D)
        gq, gs = _quantize_rows(gy, recipe)
        w2tq, w2ts = _quantize_experts(w_down.transpose(1, 2), recipe)  # [E, D, I] column-major
        d_act = _scaled_grouped(gq, gs, w2tq, w2ts, offs)  # (S, I)
        grad_down = _grouped_wgrad(gy.t(), act, offs)  # [E, D, I]
        d_h = fused_elementwise(silu_mul_backward, h, d_act)  # (S, 2I)
        dhq, dhs = _quantize_rows(d_h, recipe)
        w1tq, w1ts = _quantize_experts(w_gate_up.transpose(1, 2), recipe)  # [E, 2I, D] column-major
        d_x = _scaled_grouped(dhq, dhs, w1tq, w1ts, offs)  # (S, D)
        grad_gate_up = _grouped_wgrad(d_h.t(), xb, offs)  # [E, 2I, D]
        return (
            d_x.to(ctx.x_dtype),
            grad_gate_up.to(w_gate_up.dtype),
            grad_down.to(w_down.dtype),
            None,
            None,
            None,
        )


def grouped_fp8_unusable_reason(device: torch.device) -> str | None:
    """None where `_Float8GroupedMLP` runs on PyTorch's grouped FP8 kernel, else why not."""
    if device.type != "cuda":
        return f"no grouped FP8 GEMM on {device.type}"
    if not hasattr(torch, "_scaled_grouped_mm"):
        return f"torch {torch.__version__} has no torch._scaled_grouped_mm"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (9, 0):
        return f"torch._scaled_grouped_mm needs compute capability 9.0+, this GPU has {major}.{minor}"
    return None


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


class Float8GroupedExperts(GroupedExperts):
    """``GroupedExperts`` whose per-expert matmuls run in FP8 (native path)."""

    recipe: Float8Recipe
    # "auto": grouped FP8 GEMMs where grouped_fp8_unusable_reason says they run, else per
    # expert; "grouped" forces them (off CUDA: emulated, for tests); "per_expert" never
    grouped: str = "auto"
    _grouped_failed: str | None = None

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

    def _use_grouped(self, x: torch.Tensor) -> bool:
        if self.grouped == "per_expert" or self.recipe.scaling == "block" or x.shape[0] == 0:
            return False
        if self.grouped == "grouped":
            return True
        return self._grouped_failed is None and grouped_fp8_unusable_reason(x.device) is None

    def forward(self, x_sorted: torch.Tensor, counts: Counts) -> torch.Tensor:
        """``x_sorted`` ``(S, D)`` grouped by expert, ``counts[e]`` rows each; returns ``(S, D)``."""
        device_type = x_sorted.device.type
        out_dtype = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else x_sorted.dtype
        )
        if self._use_grouped(x_sorted):
            args = (x_sorted.contiguous(), self.gate_up_proj, self.down_proj)
            offs = group_offsets(counts, x_sorted.device)
            try:
                return _Float8GroupedMLP.apply(*args, offs, self.recipe, out_dtype)
            except RuntimeError as err:  # a kernel this GPU/PyTorch lacks: per-expert FP8 instead
                if self.grouped == "grouped":
                    raise
                type(self)._grouped_failed = f"{type(err).__name__}: {str(err)[:200]}"
                logger.warning("grouped FP8 experts unavailable (%s); per-expert FP8 GEMMs", err)
        counts = host_counts(counts)
        if self.recipe.scaling == "tensorwise" and x_sorted.shape[0] > 0:
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


class TEGroupedExperts(GroupedExperts):
    """``GroupedExperts`` on two ``te.GroupedLinear`` (Transformer Engine path)."""

    gate_up: Any  # te.GroupedLinear
    down: Any
    pad: Any  # te.Fp8Padding / Fp8Unpadding, or None on a TE without them
    unpad: Any

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

    def forward(self, x_sorted: torch.Tensor, counts: Counts) -> torch.Tensor:
        """``x_sorted`` ``(S, D)`` grouped by expert, ``counts[e]`` rows each; returns ``(S, D)``."""
        counts = host_counts(counts)
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
