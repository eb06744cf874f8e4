"""DeepSeekMoE: shared experts plus routed experts with aux-loss-free balancing (DeepSeek-V3 §2.1.2).

``DeepSeekMoE.forward`` reads like the paper::

    weights, indices, scores = gate(x)            # fp32 routing, bias only chooses
    x_sorted, counts, state = dispatcher.dispatch(x, indices)
    y_sorted = experts(x_sorted, counts)          # each expert on its contiguous slice
    y = dispatcher.combine(y_sorted, weights, state)
    return y + shared_experts(x)

**Expert-parallel seam (DESIGN seam 2).** ``dispatcher`` is a plain object with two methods:

* ``dispatch(x (N, D), indices (N, k)) -> (x_sorted (S, D), counts (E_local,) list[int], state)``:
  the token copies that the *local* experts must process, grouped by local expert in order;
* ``combine(y_sorted (S, D), weights (N, k), state) -> (N, D)``: the weighted sum back in token order.

`TokenDispatcher` is the single-device one (sort by expert, ``index_add`` back). `deepsuite.parallel`
replaces ``moe.dispatcher`` with an all-to-all dispatcher and shards ``moe.experts`` (stacked
``[E_local, …]`` tensors) without touching this file; routing, counts, the bias and the balance
loss stay here and use global expert ids.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsuite.layers.mlp import SwiGLU


class MoERouter(nn.Module):
    """Top-k router with group-limited routing and a selection-only bias (DeepSeek-V3).

    Scores are computed in float32 (sigmoid, or softmax for DeepSeek-V2). ``e_score_correction_bias``
    is added to the scores only to *choose* experts (and groups); the routing weights are the
    unbiased scores of the chosen experts, renormalised (``norm_topk_prob``) and times ``route_scale``.
    With ``n_groups > 1`` a token may only use experts of its ``topk_groups`` best groups; a group
    scores the sum of its top-2 biased scores (sigmoid) or its best score (softmax, as V2).
    """

    e_score_correction_bias: torch.Tensor

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        n_groups: int = 1,
        topk_groups: int = 1,
        score_func: str = "sigmoid",
        route_scale: float = 1.0,
        norm_topk_prob: bool = True,
    ) -> None:
        super().__init__()
        if score_func not in ("sigmoid", "softmax"):
            raise ValueError(f"score_func={score_func!r} must be 'sigmoid' or 'softmax'")
        if n_experts % n_groups:
            raise ValueError(f"n_groups={n_groups} does not divide n_experts={n_experts}")
        self.n_experts = n_experts
        self.top_k = top_k
        self.n_groups = n_groups
        self.topk_groups = topk_groups
        self.score_func = score_func
        self.route_scale = route_scale
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        # float32 even when the model is cast to bf16 (see DeepSeekMoE._apply)
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route tokens ``x`` ``(N, D)``: returns weights ``(N, k)`` fp32, expert ids ``(N, k)``, scores ``(N, E)`` fp32."""
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias.float()  # selection only
        if self.n_groups > 1:
            grouped = choice.view(-1, self.n_groups, self.n_experts // self.n_groups)  # (N, G, E/G)
            if self.score_func == "sigmoid":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_groups, dim=-1, sorted=False).indices  # (N, kg)
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        indices = choice.topk(self.top_k, dim=-1, sorted=False).indices  # (N, k)
        weights = scores.gather(1, indices)  # unbiased scores weight the experts
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices, scores

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) gate, zero bias."""
        nn.init.normal_(self.weight, mean=0.0, std=std)
        self.e_score_correction_bias.zero_()


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` can run on ``x``'s device and dtype.

    CPU: fp32 and bf16 (torch >= 2.9 has a CPU kernel; it rejects fp64). CUDA: bf16 on SM80+ only.
    """
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 8
    return False


def _mm_split_rows(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, parts: int) -> None:
    """``out = a @ b`` with the rows of ``a`` cut into ``parts`` equal blocks, one batched GEMM.

    ``a`` ``(n, K)`` and ``out`` ``(n, N)`` row-contiguous, ``b`` ``(K, N)`` any strides (shared by
    every block through a stride-0 batch). The ``n mod parts`` leftover rows take one small ``mm``.
    """
    n = a.shape[0]
    rows = n // parts
    if parts <= 1 or rows == 0:
        torch.mm(a, b, out=out)
        return
    m = rows * parts
    torch.bmm(
        a[:m].view(parts, rows, a.shape[1]),
        b.expand(parts, *b.shape),
        out=out[:m].view(parts, rows, out.shape[1]),
    )
    if m < n:
        torch.mm(a[m:], b, out=out[m:])


def _mm_split_out_rows(out: torch.Tensor, g: torch.Tensor, x: torch.Tensor, parts: int) -> None:
    """``out = gᵀ @ x`` (a weight gradient ``(N, K)``, contiguous) with the ``N`` rows of ``out``
    cut into ``parts`` blocks, one batched GEMM; ``g`` ``(n, N)`` and ``x`` ``(n, K)`` row-contiguous.
    """
    n, big_n = g.shape
    if parts <= 1 or big_n % parts:
        torch.mm(g.t(), x, out=out)
        return
    block = big_n // parts
    torch.bmm(
        g.view(n, parts, block).permute(1, 2, 0),  # (parts, N/parts, n)
        x.expand(parts, *x.shape),
        out=out.view(parts, block, out.shape[1]),
    )


class _CPUExpertsMLP(torch.autograd.Function):
    """Routed SwiGLU experts on CPU with each expert's GEMMs split into equal blocks per thread.

    Forward ``y_e = (silu(x_e W_gate,eᵀ) ⊙ x_e W_up,eᵀ) W_down,eᵀ`` for the contiguous row block
    ``x_e`` of expert ``e``; backward written out (no ``chunk``/``cat``, no per-expert zero
    gradients). Every product is one ``bmm`` over ``parts`` blocks of the expert's rows (or of
    the weight gradient's rows) with the weight shared through a stride-0 batch: the BLAS gives
    each thread whole independent GEMMs (one fork/join per product) instead of splitting one
    medium-size GEMM internally. Same arithmetic per output element as ``torch.mm``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        counts: tuple[int, ...],
        splits: tuple[int, ...],
    ) -> torch.Tensor:
        d_ffn = down_proj.shape[2]
        h = x.new_empty(x.shape[0], 2 * d_ffn)  # (S, 2I): gate | up
        start = 0
        for n, p, w in zip(counts, splits, gate_up_proj.unbind(0)):
            if n:
                _mm_split_rows(h[start : start + n], x[start : start + n], w.t(), p)
                start += n
        gate, up = h[:, :d_ffn], h[:, d_ffn:]
        act = F.silu(gate).mul_(up)  # (S, I)
        y = x.new_empty(x.shape[0], down_proj.shape[1])  # (S, D)
        start = 0
        for n, p, w in zip(counts, splits, down_proj.unbind(0)):
            if n:
                _mm_split_rows(y[start : start + n], act[start : start + n], w.t(), p)
                start += n
        ctx.save_for_backward(x, h, act, gate_up_proj, down_proj)
        ctx.counts, ctx.splits = counts, splits
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, h, act, gate_up_proj, down_proj = ctx.saved_tensors
        counts, splits = ctx.counts, ctx.splits
        need_x, need_gate_up, need_down = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        d_ffn = down_proj.shape[2]
        n_rows = x.shape[0]
        offsets = [0]
        for n in counts:
            offsets.append(offsets[-1] + n)

        grad_down = torch.empty_like(down_proj) if need_down else None
        d_act = x.new_empty(n_rows, d_ffn)  # (S, I)
        for e, (n, p) in enumerate(zip(counts, splits)):
            s = offsets[e]
            if grad_down is not None:
                if n:
                    _mm_split_out_rows(grad_down[e], grad[s : s + n], act[s : s + n], p)
                else:
                    grad_down[e].zero_()
            if n:
                _mm_split_rows(d_act[s : s + n], grad[s : s + n], down_proj[e], p)

        gate, up = h[:, :d_ffn], h[:, d_ffn:]
        d_h = x.new_empty(n_rows, 2 * d_ffn)  # (S, 2I): d_gate | d_up
        torch.ops.aten.silu.out(gate, out=d_h[:, d_ffn:]).mul_(d_act)  # d_up, no temporary
        torch.ops.aten.silu_backward.grad_input(d_act.mul_(up), gate, grad_input=d_h[:, :d_ffn])

        grad_x = x.new_empty(x.shape) if need_x else None
        grad_gate_up = torch.empty_like(gate_up_proj) if need_gate_up else None
        for e, (n, p) in enumerate(zip(counts, splits)):
            s = offsets[e]
            if grad_gate_up is not None:
                if n:
                    _mm_split_out_rows(grad_gate_up[e], d_h[s : s + n], x[s : s + n], p)
                else:
                    grad_gate_up[e].zero_()
            if grad_x is not None and n:
                _mm_split_rows(grad_x[s : s + n], d_h[s : s + n], gate_up_proj[e], p)
        return grad_x, grad_gate_up, grad_down, None, None


class GroupedExperts(nn.Module):
    """``n_experts`` SwiGLU experts as stacked tensors (transformers 5 / DeepSpeed AutoEP layout).

    ``gate_up_proj`` ``[E, 2I, D]`` (gate rows then up rows) and ``down_proj`` ``[E, D, I]``.
    ``forward(x_sorted, counts)`` runs expert ``e`` on rows ``offset_e … offset_e + counts[e]`` of
    the expert-sorted tokens. ``implementation`` picks the kernel:

    * ``"cpu_split"``: `_CPUExpertsMLP`, each expert's GEMMs as one batched GEMM over
      ``min(threads, rows // min_rows_per_split)`` equal row blocks (CPU, fp32/fp64, no autocast);
    * ``"grouped_mm"``: one ``F.grouped_mm`` per projection (where PyTorch has the kernel);
    * ``"loop"``: dense matmuls over the contiguous slices (weights taken with ``unbind`` so the
      backward writes each expert's gradient once, not a full-size zero tensor per expert);
    * ``"auto"`` (default): the first of these that applies.

    Measured with 2 threads (tools/benchmarks/moe.py shapes, fp32): ``F.grouped_mm`` on CPU is a
    loop of ``mm`` whose medium-size GEMMs (~384 × 1024 × 1024) reach only 20–40 % of a large
    matmul's rate when the cores are shared with other processes (each GEMM forks and joins both
    threads several times); ``cpu_split`` keeps 50–65 % there. On idle cores both reach 75–85 %
    (``cpu_split`` a few per cent ahead), and with one thread they are the same loop.
    ``use_grouped_mm = False`` is kept as the switch to the reference loop.
    """

    def __init__(self, n_experts: int, d_model: int, d_ffn: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.d_model = d_model
        self.d_ffn = d_ffn
        self.implementation = "auto"
        self.min_rows_per_split = 64  # smaller blocks lose more to packing the weight than they gain
        self.cpu_threads: int | None = None  # blocks per expert GEMM; None: torch.get_num_threads()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * d_ffn, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_ffn))

    @property
    def use_grouped_mm(self) -> bool:
        """False when the reference per-expert loop is forced (``implementation == "loop"``)."""
        return self.implementation != "loop"

    @use_grouped_mm.setter
    def use_grouped_mm(self, value: bool) -> None:
        self.implementation = "auto" if value else "loop"

    def _kernel(self, x: torch.Tensor) -> str:
        if self.implementation != "auto":
            return self.implementation
        if (
            x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and self.gate_up_proj.dtype == x.dtype
            and self.down_proj.dtype == x.dtype
            and not torch.is_autocast_enabled("cpu")
        ):
            return "cpu_split"
        probe = x
        if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            probe = x[:0].to(torch.get_autocast_dtype("cuda"))  # forward casts to the autocast dtype
        # the grouped_mm kernels want 16-byte aligned row strides
        aligned = all(n * probe.element_size() % 16 == 0 for n in (self.d_model, self.d_ffn))
        if grouped_mm_supported(probe) and aligned:
            return "grouped_mm"
        return "loop"

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``x_sorted`` ``(S, D)`` grouped by expert, ``counts[e]`` rows each; returns ``(S, D)``."""
        kernel = self._kernel(x_sorted)
        if kernel == "cpu_split":
            threads = self.cpu_threads or torch.get_num_threads()
            splits = tuple(max(1, min(threads, n // self.min_rows_per_split)) for n in counts)
            return _CPUExpertsMLP.apply(
                x_sorted.contiguous(), self.gate_up_proj, self.down_proj, tuple(counts), splits
            )
        if kernel == "grouped_mm" and x_sorted.shape[0] > 0:
            w_gate_up: torch.Tensor = self.gate_up_proj
            w_down: torch.Tensor = self.down_proj
            if x_sorted.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
                # autocast does not cover grouped_mm: cast as it would for F.linear (CUDA kernels are bf16)
                dtype = torch.get_autocast_dtype("cuda")
                x_sorted, w_gate_up, w_down = x_sorted.to(dtype), w_gate_up.to(dtype), w_down.to(dtype)
            offs = torch.tensor(counts, device=x_sorted.device).cumsum(0).to(torch.int32)
            h = F.grouped_mm(x_sorted, w_gate_up.transpose(-2, -1), offs=offs)  # (S, 2I)
            gate, up = h.chunk(2, dim=-1)
            return F.grouped_mm(F.silu(gate) * up, w_down.transpose(-2, -1), offs=offs)  # (S, D)
        return self._loop(x_sorted, counts)

    def _loop(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outputs = []
        # split (backward: one cat) rather than slicing, whose backward writes a full-size zero
        # gradient of x_sorted per expert; unbind likewise for the weights
        slices = x_sorted.split(list(counts))
        for xe, w_gate_up, w_down in zip(slices, self.gate_up_proj.unbind(0), self.down_proj.unbind(0)):
            if xe.shape[0] == 0:
                continue
            gate, up = F.linear(xe, w_gate_up).chunk(2, dim=-1)  # (n, I) each
            outputs.append(F.linear(F.silu(gate) * up, w_down))  # (n, D)
        if not outputs:
            return x_sorted.new_zeros(0, self.d_model) + 0 * x_sorted.sum()
        return torch.cat(outputs, dim=0)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) weights."""
        nn.init.normal_(self.gate_up_proj, mean=0.0, std=std)
        nn.init.normal_(self.down_proj, mean=0.0, std=std)


class _GatherCopies(torch.autograd.Function):
    """Rows ``x[order // k]``: the ``N·k`` token copies in expert order, gathered in one pass.

    Backward: un-permute the copies' gradients with a gather (``grad[inverse]``) and sum each
    token's ``k`` copies. Plain indexing would back-propagate through an accumulating scatter
    (``index_put_`` with ``accumulate=True``), markedly slower on CPU.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, top_k: int
    ) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x[order // top_k]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad[inverse].view(-1, ctx.top_k, grad.shape[-1]).sum(dim=1), None, None, None


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` for a permutation ``perm``, whose backward is the gather ``grad[inverse]``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x[perm]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


class TokenDispatcher:
    """Single-device dispatch: sort the ``N·k`` token copies by expert; combine by un-sorting and
    summing each token's ``k`` weighted copies (deterministic, no atomics, gathers only).

    The state passed from ``dispatch`` to ``combine`` is ``(order, inverse)``: the stable sort of
    the flattened expert ids and its inverse permutation.
    """

    def __init__(self, n_experts: int) -> None:
        self.n_experts = n_experts

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, list[int], Any]:
        """Token copies ``(N·k, D)`` sorted by expert, rows per expert, and the permutation."""
        top_k = indices.shape[1]
        flat = indices.flatten()  # (N·k,)
        order = flat.argsort(stable=True)  # copy positions, grouped by expert
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        return _GatherCopies.apply(x, order, inverse, top_k), counts, (order, inverse)

    def combine(self, y_sorted: torch.Tensor, weights: torch.Tensor, state: Any) -> torch.Tensor:
        """``out[t] = Σ_j weights[t, j] · y(copy j of t)`` as ``(N, D)``."""
        order, inverse = state
        y = _PermuteRows.apply(y_sorted, inverse, order).view(*weights.shape, y_sorted.shape[-1])  # (N, k, D)
        if y.is_cuda:  # a (1 × k) @ (k × D) bmm per token is a poor GEMM on GPUs: multiply and sum
            return (y * weights[..., None].to(y.dtype)).sum(dim=1)  # (N, D)
        return torch.bmm(weights[:, None, :].to(y.dtype), y).squeeze(1)  # (N, D)


def sequence_balance_loss(
    scores: torch.Tensor, indices: torch.Tensor, batch: int, alpha: float
) -> torch.Tensor:
    """Sequence-wise balance loss of the V3 report (eq. 17–20), averaged over sequences.

    ``L = α Σ_i f_i P_i`` per sequence, with ``f_i = E / (k·T) · #{t : i ∈ TopK_t}`` and
    ``P_i = 1/T Σ_t s'_{i,t}``, ``s'`` the scores normalised per token. ``scores`` ``(B·T, E)``,
    ``indices`` ``(B·T, k)``.
    """
    n_tokens, n_experts = scores.shape
    top_k = indices.shape[1]
    seq_len = n_tokens // batch
    s = scores.view(batch, seq_len, n_experts)
    s = s / s.sum(dim=-1, keepdim=True)  # s'
    p = s.mean(dim=1)  # (B, E)
    hits = torch.zeros(batch, n_experts, device=scores.device, dtype=scores.dtype)
    hits.scatter_add_(
        1, indices.view(batch, seq_len * top_k), torch.ones_like(indices, dtype=scores.dtype).view(batch, -1)
    )
    f = hits * (n_experts / (top_k * seq_len))  # (B, E)
    return alpha * (f * p).sum(dim=-1).mean()


class DeepSeekMoE(nn.Module):
    """Shared experts plus top-k routed experts (DeepSeekMoE), with the balancing hooks.

    Buffers: ``tokens_per_expert`` (float32 ``[E]``, non-persistent) counts routed token copies in
    training forward passes since the last `update_bias`; the router's ``e_score_correction_bias``
    (persistent, also reachable as ``moe.e_score_correction_bias``). With ``balance_loss_alpha > 0``
    each training forward leaves the sequence-wise balance loss in ``moe.aux_loss`` for the model to
    add to its loss.
    """

    tokens_per_expert: torch.Tensor

    def __init__(
        self,
        d_model: int,
        n_routed_experts: int,
        n_shared_experts: int,
        n_activated_experts: int,
        moe_inter_dim: int,
        n_expert_groups: int = 1,
        n_limited_groups: int = 1,
        score_func: str = "sigmoid",
        route_scale: float = 1.0,
        norm_topk_prob: bool = True,
        balance_loss_alpha: float = 0.0,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.n_routed_experts = n_routed_experts
        self.n_activated_experts = n_activated_experts
        self.balance_loss_alpha = balance_loss_alpha
        self.gate = MoERouter(
            d_model,
            n_routed_experts,
            n_activated_experts,
            n_expert_groups,
            n_limited_groups,
            score_func,
            route_scale,
            norm_topk_prob,
        )
        self.experts = GroupedExperts(n_routed_experts, d_model, moe_inter_dim)
        self.shared_experts = (
            SwiGLU(d_model, n_shared_experts * moe_inter_dim) if n_shared_experts > 0 else None
        )
        self.dispatcher: Any = TokenDispatcher(n_routed_experts)
        self.register_buffer(
            "tokens_per_expert", torch.zeros(n_routed_experts, dtype=torch.float32), persistent=False
        )
        self.aux_loss: torch.Tensor | None = None

    @property
    def e_score_correction_bias(self) -> torch.Tensor:
        """The router's selection bias ``[E]`` (float32, persistent)."""
        return self.gate.e_score_correction_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, T, D)`` -> ``(B, T, D)``."""
        batch, seq_len, dim = x.shape
        flat = x.reshape(-1, dim)  # (N, D)
        weights, indices, scores = self.gate(flat)  # (N, k), (N, k), (N, E)
        if self.training and self.balance_loss_alpha > 0:
            self.aux_loss = sequence_balance_loss(scores, indices, batch, self.balance_loss_alpha)
        out = self._routed(flat, weights, indices).view(batch, seq_len, dim)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    @torch.compiler.disable
    def _routed(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Count the load, dispatch, run the routed experts, combine: ``(N, D)``.

        Runs eagerly under ``torch.compile``: the rows per expert are data (host-side split sizes
        for the experts and the all-to-all), so a compiled version would recompile for every new
        routing. The router, attention, norms and shared experts around it still compile."""
        # not while backward recomputes this layer (activation checkpointing): counted once per step
        if self.training and torch._C._current_graph_task_id() == -1:
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(
                    indices.flatten(), minlength=self.n_routed_experts
                ).float()
        x_sorted, counts, state = self.dispatcher.dispatch(flat, indices)
        y_sorted = self.experts(x_sorted, counts)
        return self.dispatcher.combine(y_sorted, weights, state)

    @torch.no_grad()
    def update_bias(self, global_load: torch.Tensor, rate: float) -> None:
        """Aux-loss-free balancing step: ``bias += rate · sign(mean(load) − load)``; zero the counts.

        ``global_load`` ``[E]`` is the token count per expert over the whole data-parallel world
        (`deepsuite.parallel.balancing.update_router_biases` all-reduces ``tokens_per_expert``).
        """
        load = global_load.to(self.e_score_correction_bias.device, torch.float32)
        self.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))
        self.tokens_per_expert.zero_()

    def _apply(self, fn: Any, recurse: bool = True) -> DeepSeekMoE:
        # keep the routing buffers in float32 through model.to(bf16) (transformers keeps
        # e_score_correction_bias in fp32 too)
        super()._apply(fn, recurse)
        for module, name in ((self.gate, "e_score_correction_bias"), (self, "tokens_per_expert")):
            buf = getattr(module, name)
            if buf.is_floating_point() and buf.dtype != torch.float32:
                setattr(module, name, buf.float())
        return self

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Normal(0, std) router and experts, zero bias and counts."""
        self.gate.init_weights(std)
        self.experts.init_weights(std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)
        self.tokens_per_expert.zero_()
