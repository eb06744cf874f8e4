"""Kernels behind `deepsuite.layers.moe`: the routed experts' SwiGLU and the dispatcher's gathers.

Every experts kernel computes ``y_e = (silu(x_e W_gate,eᵀ) ⊙ x_e W_up,eᵀ) W_down,eᵀ`` on the
contiguous row block ``x_e`` of expert ``e`` (rows sorted by expert, ``counts[e]`` rows each); they
differ in speed only (tests/unit/test_moe.py checks each against a float64 loop):

* ``"cpu_split"``: `_CPUExpertsMLP`, each expert's GEMMs as one batched GEMM over
  ``min(threads, rows // min_rows_per_split)`` equal row blocks (CPU, fp32/fp64, no autocast);
* ``"grouped_mm"``: one ``F.grouped_mm`` per projection (where PyTorch has the kernel); ``counts``
  may then be a device tensor (no host sync), and on CUDA the SwiGLU between the two GEMMs is one
  fused kernel each way (`swiglu_act`, compiled) that keeps only the GEMM output for backward;
* ``"loop"``: dense matmuls over the contiguous slices, the reference;
* ``"auto"``: the first of these that applies (`select_kernel`).

Why the CPU kernel exists, with measurements: docs/benchmarks.md ("MoE experts on CPU").
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

Counts = Sequence[int] | torch.Tensor  # rows per expert: host list, or a device tensor (grouped_mm only)


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


def select_kernel(
    implementation: str, x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
) -> str:
    """The experts kernel for ``implementation`` on input ``x``; ``"auto"`` picks the first that applies."""
    if implementation != "auto":
        return implementation
    if (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and gate_up_proj.dtype == x.dtype
        and down_proj.dtype == x.dtype
        and not torch.is_autocast_enabled("cpu")
    ):
        return "cpu_split"
    probe = x
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        probe = x[:0].to(torch.get_autocast_dtype("cuda"))  # forward casts to the autocast dtype
    # the grouped_mm kernels want 16-byte aligned row strides
    d_model, d_ffn = down_proj.shape[1], down_proj.shape[2]
    aligned = all(n * probe.element_size() % 16 == 0 for n in (d_model, d_ffn))
    if grouped_mm_supported(probe) and aligned:
        return "grouped_mm"
    return "loop"


def group_offsets(counts: Counts, device: torch.device) -> torch.Tensor:
    """End row of each expert's block, int32 on ``device`` (``F.grouped_mm``'s ``offs``)."""
    if isinstance(counts, torch.Tensor):
        return counts.to(device).cumsum(0, dtype=torch.int32)
    return torch.tensor(list(counts), device=device).cumsum(0).to(torch.int32)


def host_counts(counts: Counts) -> list[int]:
    """``counts`` as a host list (one device sync when they are a device tensor)."""
    return counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) ⊙ up`` of ``h = [gate | up]`` in fp32, rounded once to ``h.dtype``."""
    gate, up = h.to(torch.promote_types(h.dtype, torch.float32)).chunk(2, dim=-1)
    return F.silu(gate).mul(up).to(h.dtype)


def silu_mul_backward(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``[d gate | d up]`` of `silu_mul` at ``h`` for the output gradient ``grad``."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    gate, up = h.to(dtype).chunk(2, dim=-1)
    g = grad.to(dtype)
    sig = torch.sigmoid(gate)
    d_gate = g * up * sig * (1 + gate * (1 - sig))
    return torch.cat([d_gate, g * gate * sig], dim=-1).to(h.dtype)


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    # one fused elementwise kernel per direction; rows vary from step to step, hence dynamic
    return torch.compile(fn, dynamic=True)


def fused_elementwise(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, compiled into fused kernels when ``args[0]`` is on CUDA (eager elsewhere, and
    where compiling fails)."""
    if args[0].is_cuda and _FUSE_ON_CUDA[0]:
        try:
            return _compiled(fn)(*args)
        except Exception as err:  # no Triton / inductor here: the eager ops compute the same
            _FUSE_ON_CUDA[0] = False
            logger.warning("fused SwiGLU kernels unavailable (%s); using eager ops", err)
    return fn(*args)


_FUSE_ON_CUDA = [True]


class _SwiGLUAct(torch.autograd.Function):
    """``silu(gate) ⊙ up`` of ``h = [gate | up]`` ``(S, 2I)``; saves only ``h`` (no ``silu(gate)``)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        return fused_elementwise(silu_mul, h)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        return fused_elementwise(silu_mul_backward, h, grad.contiguous())


def swiglu_act(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) ⊙ up`` for ``h = [gate | up]`` ``(S, 2I)`` -> ``(S, I)``, one fused kernel each way
    on CUDA (computed in fp32, rounded once)."""
    return _SwiGLUAct.apply(h)


def swiglu_experts(
    kernel: str,
    x_sorted: torch.Tensor,
    counts: Counts,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    threads: int | None = None,
    min_rows_per_split: int = 64,
) -> torch.Tensor:
    """Expert ``e``'s SwiGLU on its ``counts[e]`` rows of ``x_sorted`` ``(S, D)``: ``(S, D)``.

    ``counts`` may be a device tensor; only the ``grouped_mm`` kernel uses it without a host sync.
    ``gate_up_proj`` ``[E, 2I, D]``, ``down_proj`` ``[E, D, I]``; ``threads`` (default
    ``torch.get_num_threads()``) and ``min_rows_per_split`` size the ``cpu_split`` blocks.
    """
    if kernel == "cpu_split":
        threads = threads or torch.get_num_threads()
        rows = host_counts(counts)
        splits = tuple(max(1, min(threads, n // min_rows_per_split)) for n in rows)
        return _CPUExpertsMLP.apply(x_sorted.contiguous(), gate_up_proj, down_proj, tuple(rows), splits)
    if kernel == "grouped_mm" and x_sorted.shape[0] > 0:
        w_gate_up, w_down = gate_up_proj, down_proj
        if x_sorted.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            # autocast does not cover grouped_mm: cast as it would for F.linear (CUDA kernels are bf16)
            dtype = torch.get_autocast_dtype("cuda")
            x_sorted, w_gate_up, w_down = x_sorted.to(dtype), w_gate_up.to(dtype), w_down.to(dtype)
        offs = group_offsets(counts, x_sorted.device)
        h = F.grouped_mm(x_sorted, w_gate_up.transpose(-2, -1), offs=offs)  # (S, 2I)
        if h.is_cuda:
            act = swiglu_act(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return F.grouped_mm(act, w_down.transpose(-2, -1), offs=offs)  # (S, D)
    return _loop(x_sorted, host_counts(counts), gate_up_proj, down_proj)


def _loop(
    x_sorted: torch.Tensor, counts: list[int], gate_up_proj: torch.Tensor, down_proj: torch.Tensor
) -> torch.Tensor:
    outputs = []
    # split (backward: one cat) rather than slicing, whose backward writes a full-size zero
    # gradient of x_sorted per expert; unbind likewise for the weights
    slices = x_sorted.split(list(counts))
    for xe, w_gate_up, w_down in zip(slices, gate_up_proj.unbind(0), down_proj.unbind(0)):
        if xe.shape[0] == 0:
            continue
        gate, up = F.linear(xe, w_gate_up).chunk(2, dim=-1)  # (n, I) each
        outputs.append(F.linear(F.silu(gate) * up, w_down))  # (n, D)
    if not outputs:
        # no rows (an expert-parallel rank that received no tokens): zero gradients for the weights,
        # as `_CPUExpertsMLP` gives, so that ZeRO reduces the same gradients on every replica
        weights = gate_up_proj.sum() + down_proj.sum()
        return x_sorted.new_zeros(0, down_proj.shape[1]) + 0 * (x_sorted.sum() + weights)
    return torch.cat(outputs, dim=0)


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


def gather_copies(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
    """``x[order // top_k]`` ``(N·k, D)``, backward by gathers (`_GatherCopies`)."""
    return _GatherCopies.apply(x, order, inverse, top_k)


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x[perm]`` for a permutation ``perm``, backward ``grad[inverse]`` (`_PermuteRows`)."""
    return _PermuteRows.apply(x, perm, inverse)
