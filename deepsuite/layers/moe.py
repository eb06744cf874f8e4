"""DeepSeekMoE: shared experts plus routed experts with aux-loss-free balancing (DeepSeek-V3 §2.1.2).

``DeepSeekMoE.forward`` reads like the paper::

    weights, indices, scores = gate(x)            # fp32 routing, bias only chooses
    x_sorted, counts, state = dispatcher.dispatch(x, indices)
    y_sorted = experts(x_sorted, counts)          # each expert on its contiguous slice
    y = dispatcher.combine(y_sorted, weights, state)
    return y + shared_experts(x)

**Expert-parallel seam (DESIGN seam 2).** ``dispatcher`` is a plain object with two methods:

* ``dispatch(x (N, D), indices (N, k)) -> (x_sorted (S, D), counts (E_local,), state)``:
  the token copies that the *local* experts must process, grouped by local expert in order;
  ``counts`` a host ``list[int]``, or a device tensor where no host needs them (one GPU);
* ``combine(y_sorted (S, D), weights (N, k), state) -> (N, D)``: the weighted sum back in token order.

`TokenDispatcher` is the single-device one (sort by expert, un-sort and sum back). `deepsuite.parallel`
replaces ``moe.dispatcher`` with an all-to-all dispatcher and shards ``moe.experts`` (stacked
``[E_local, …]`` tensors) without touching this file; routing, counts, the bias and the balance
loss stay here and use global expert ids. The experts' and the dispatcher's kernels (hand-written
backward passes, the CPU and grouped GEMMs) are in `deepsuite.layers.moe_kernels`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsuite.layers.mlp import SwiGLU
from deepsuite.layers.moe_kernels import (
    Counts,
    gather_copies,
    permute_rows,
    select_kernel,
    swiglu_experts,
)


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


class GroupedExperts(nn.Module):
    """``n_experts`` SwiGLU experts as stacked tensors (transformers 5 / DeepSpeed AutoEP layout).

    ``gate_up_proj`` ``[E, 2I, D]`` (gate rows then up rows) and ``down_proj`` ``[E, D, I]``.
    Expert ``e`` computes ``y_e = (silu(x_e W_gate,eᵀ) ⊙ x_e W_up,eᵀ) W_down,eᵀ`` on its contiguous
    rows ``x_e`` of the expert-sorted tokens. ``implementation`` picks the kernel that computes it
    (`deepsuite.layers.moe_kernels`): ``"auto"`` (default), ``"cpu_split"``, ``"grouped_mm"`` or
    ``"loop"`` (the reference); ``use_grouped_mm = False`` is kept as the switch to the loop.
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
        return select_kernel(self.implementation, x, self.gate_up_proj, self.down_proj)

    def forward(self, x_sorted: torch.Tensor, counts: Counts) -> torch.Tensor:
        """``x_sorted`` ``(S, D)`` grouped by expert, ``counts[e]`` rows each; returns ``(S, D)``."""
        return swiglu_experts(
            self._kernel(x_sorted),
            x_sorted,
            counts,
            self.gate_up_proj,
            self.down_proj,
            threads=self.cpu_threads,
            min_rows_per_split=self.min_rows_per_split,
        )

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) weights."""
        nn.init.normal_(self.gate_up_proj, mean=0.0, std=std)
        nn.init.normal_(self.down_proj, mean=0.0, std=std)


class TokenDispatcher:
    """Single-device dispatch: sort the ``N·k`` token copies by expert; combine by un-sorting and
    summing each token's ``k`` weighted copies (deterministic, no atomics, gathers only).

    The state passed from ``dispatch`` to ``combine`` is ``(order, inverse)``: the stable sort of
    the flattened expert ids and its inverse permutation. On CUDA the counts stay a device tensor:
    the grouped GEMMs read them there, so routing costs no host sync.
    """

    def __init__(self, n_experts: int) -> None:
        self.n_experts = n_experts

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, Counts, Any]:
        """Token copies ``(N·k, D)`` sorted by expert, rows per expert, and the permutation."""
        top_k = indices.shape[1]
        flat = indices.flatten()  # (N·k,)
        order = flat.argsort(stable=True)  # copy positions, grouped by expert
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(flat, minlength=self.n_experts)
        rows: Counts = counts if x.is_cuda else counts.tolist()
        return gather_copies(x, order, inverse, top_k), rows, (order, inverse)

    def combine(self, y_sorted: torch.Tensor, weights: torch.Tensor, state: Any) -> torch.Tensor:
        """``out[t] = Σ_j weights[t, j] · y(copy j of t)`` as ``(N, D)``."""
        order, inverse = state
        y = permute_rows(y_sorted, inverse, order).view(*weights.shape, y_sorted.shape[-1])  # (N, k, D)
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
        x_sorted, counts, state = self.dispatcher.dispatch(flat, indices)  # (S, D), S = N·k on one device
        y_sorted = self.experts(x_sorted, counts)  # (S, D)
        return self.dispatcher.combine(y_sorted, weights, state)  # (N, D)

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
