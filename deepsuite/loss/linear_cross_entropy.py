"""Chunked linear cross-entropy: ``cross_entropy(hidden @ weight.T + bias, labels)`` without ever
holding the full ``(tokens, vocab)`` logits.

The tokens are processed in chunks small enough that one chunk of float32 logits stays under
``_CHUNK_BYTES`` (256 MiB). Each chunk's logits are computed into one preallocated buffer, turned
into probabilities in place, and immediately reduced to the per-token loss and (when gradients are
needed) to the chunk's contribution to ``grad_hidden`` / ``grad_weight`` / ``grad_bias``.

Two ways to get the gradient, chosen by ``precompute_grad``:

* **In the forward pass** (default for ``reduction="mean"|"sum"``): the upstream gradient of a scalar
  loss is one number, so the gradient of the loss itself can be accumulated while the chunk's
  probabilities are at hand and merely scaled in ``backward``. Three matmuls over the vocabulary in
  total, the same as materialised logits; this is what Liger's fused linear cross-entropy does.
* **Recomputed in backward** (``reduction="none"``, or ``precompute_grad=False``): the forward pass
  keeps only the per-token log-sum-exp; ``backward`` recomputes each chunk's logits, forms
  ``softmax - smoothed one-hot`` scaled per token by the upstream gradient, and accumulates the
  gradients. Four matmuls, but no gradient work when ``backward`` never runs.

**Precision.** The three vocabulary matmuls run in the *matmul dtype*: the inputs' dtype, or under
``torch.autocast`` the autocast dtype (as ``F.linear`` would); the softmax, the loss and the
gradient accumulators are float32 (float64 for float64 inputs). With a bfloat16/float16 matmul dtype
the chunk buffer holds that dtype (so twice the tokens fit the budget): the matmul writes the
logits rounded once, as materialised logits under autocast would be; row blocks of them go through
a small float32 scratch (softmax, loss, ``d loss / d logits``), which is rounded back into the
buffer for the two gradient matmuls; a float32 weight gradient is accumulated over the chunks in
float32.

Ignored tokens (``labels == ignore_index``) are dropped before any matmul: they cost nothing, get a
zero loss and a zero gradient. Semantics match ``F.cross_entropy`` on the materialised logits,
including label smoothing (``(1 - s)·nll + s·mean_c(-log p_c)``) and the mean over an all-ignored
batch (NaN loss, zero gradients).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

_CHUNK_BYTES = 256 * 1024 * 1024
"""Upper bound on one chunk of logits; ``chunk_size`` is capped so that chunk×V×element_size fits."""

_SCRATCH_BYTES = 128 * 1024 * 1024
"""Float32 scratch for row blocks of low-precision logits. Not smaller: CPU row reductions over a
few rows of a 50k vocabulary slow down many-fold with 2 threads on shared cores (measured: ``amax``
over 83-row blocks 10x slower than over 2048 rows; 512–1024-row blocks as fast as whole chunks)."""

_ADD_BLOCK_BYTES = 8 * 1024 * 1024
"""Row blocks of the mixed-dtype weight-gradient add: its float32 temporaries stay small enough
for the allocator to reuse them (large ones are fresh pages, paid in page faults on every call)."""

_REDUCTIONS = ("mean", "sum", "none")


def chunk_rows(chunk_size: int, vocab_size: int, element_size: int = 4) -> int:
    """Tokens per chunk: at most ``chunk_size`` and at most ``_CHUNK_BYTES`` of logits."""
    return max(1, min(chunk_size, _CHUNK_BYTES // (vocab_size * element_size)))


def _logits_into(
    out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``out = h @ weight.T + bias``, all in the matmul dtype  # (m, V)."""
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _softmax_(z: torch.Tensor) -> torch.Tensor:
    """Row softmax of ``z`` in place."""
    if z.device.type in ("cpu", "cuda"):
        # The CPU and CUDA last-dim softmax kernels read each element before writing the same
        # element, so writing the output over the input is exact (checked against torch.softmax in
        # tests on both) and takes one fused pass instead of sub_/exp_/sum/div_ (2x faster on H100).
        torch._softmax(z, -1, False, out=z)
    else:
        z.sub_(z.amax(dim=1, keepdim=True)).exp_()
        z.div_(z.sum(dim=1, keepdim=True))
    return z


def _subtract_targets_(z: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Turn probabilities ``z`` (m, V) into ``d loss_i / d logits_i = p - (1-s)·onehot(y) - s/V``."""
    on_target = torch.full((z.shape[0], 1), -(1.0 - label_smoothing), dtype=z.dtype, device=z.device)
    z.scatter_add_(1, y.unsqueeze(1), on_target)
    if label_smoothing > 0.0:
        z.sub_(label_smoothing / z.shape[1])
    return z


def _forward_block_(
    z: torch.Tensor,
    y: torch.Tensor,
    label_smoothing: float,
    lse: torch.Tensor,
    loss: torch.Tensor,
    gradient: bool,
) -> None:
    """Float logits ``z`` (m, V) -> per-token ``lse`` and ``loss`` (written); ``z`` becomes the
    softmax, or ``d loss_i / d logits_i`` when ``gradient``."""
    s = label_smoothing
    z_target = z.gather(1, y.unsqueeze(1)).squeeze(1)  # (m,)
    z_max = z.amax(dim=1)  # (m,)
    z_mean = z.mean(dim=1) if s > 0.0 else None
    p = _softmax_(z)
    # p at the argmax is 1 / sum(exp(z - z_max)) >= 1/V: it never underflows, so this
    # log-sum-exp is as accurate as the direct one.
    lse_c = z_max - p.amax(dim=1).log()
    lse.copy_(lse_c)
    if z_mean is None:
        loss.copy_(lse_c - z_target)
    else:
        loss.copy_(lse_c - (1.0 - s) * z_target - s * z_mean)
    if gradient:
        _subtract_targets_(p, y, s)


def _backward_block_(
    z: torch.Tensor, y: torch.Tensor, label_smoothing: float, lse: torch.Tensor, token_grad: torch.Tensor
) -> None:
    """Float logits ``z`` (m, V) -> ``token_grad_i · d loss_i / d logits_i`` in place, from the saved ``lse``."""
    p = z.sub_(lse.unsqueeze(1)).exp_()
    _subtract_targets_(p, y, label_smoothing)
    p.mul_(token_grad.unsqueeze(1))


def _float_blocks(low: torch.Tensor, scratch: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """Row blocks of the low-precision logits ``low`` (m, V), each upcast into ``scratch``."""
    step = scratch.shape[0]
    for r0 in range(0, low.shape[0], step):
        rows = slice(r0, min(r0 + step, low.shape[0]))
        yield rows, scratch[: rows.stop - r0].copy_(low[rows])


def _accumulate_grads(
    z: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    alpha: float,
    first: bool,
    grad_w_low: torch.Tensor | None = None,
) -> None:
    """Add one chunk's ``grad_h = alpha·z @ W`` (written) and ``grad_w += alpha·zᵀ @ h``.

    ``z`` (m, V), ``h`` and ``weight`` share the matmul dtype; the accumulators are in the compute
    dtype. ``first``: ``grad_w`` holds no values yet (it is written, not added to). A low-precision
    ``alpha·zᵀ @ h`` goes through ``grad_w_low`` (V, D) and is added to ``grad_w`` in row blocks.
    """
    if grad_h is not None:
        if z.dtype == grad_h.dtype:
            torch.addmm(grad_h, z, weight, beta=0.0, alpha=alpha, out=grad_h)  # (m, D)
        else:
            grad_h.copy_(torch.mm(z, weight)).mul_(alpha)
    if grad_w is None:
        return
    if z.dtype == grad_w.dtype:
        grad_w.addmm_(z.t(), h, beta=0.0 if first else 1.0, alpha=alpha)  # (V, D), in place
        return
    assert grad_w_low is not None
    grad_w_low.addmm_(z.t(), h, beta=0.0, alpha=alpha)  # alpha applied before the rounding
    if first:
        grad_w.copy_(grad_w_low)
        return
    step = max(1, _ADD_BLOCK_BYTES // (grad_w.shape[1] * grad_w.element_size()))
    for r0 in range(0, grad_w.shape[0], step):
        grad_w[r0 : r0 + step].add_(grad_w_low[r0 : r0 + step])


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,  # (N, D)
        weight: torch.Tensor,  # (V, D)
        bias: torch.Tensor | None,  # (V,)
        labels: torch.Tensor,  # (N,)
        ignore_index: int,
        label_smoothing: float,
        reduction: str,
        chunk_size: int,
        precompute: bool,
        needs_grad: tuple[bool, bool, bool],
        matmul_dtype: torch.dtype,
    ) -> torch.Tensor:
        n_tokens, d_model = hidden.shape
        vocab_size = weight.shape[0]
        compute_dtype = torch.float64 if matmul_dtype == torch.float64 else torch.float32
        device = hidden.device
        # the matmul operands, cast once (no-ops unless autocast chose a lower dtype)
        w_mm = weight.to(matmul_dtype)
        b_mm = None if bias is None else bias.to(matmul_dtype)

        labels = labels.long()  # gather/scatter index dtype
        valid_index = (labels != ignore_index).nonzero().squeeze(1)  # (M,)
        n_valid = valid_index.numel()
        if n_valid == n_tokens:
            h, y = hidden, labels
        else:
            h, y = hidden.index_select(0, valid_index), labels.index_select(0, valid_index)
        h = h.to(matmul_dtype)
        if n_valid and (int(y.min()) < 0 or int(y.max()) >= vocab_size):
            raise ValueError(
                f"linear_cross_entropy: labels must lie in [0, {vocab_size}) or equal ignore_index="
                f"{ignore_index}; got values in [{int(y.min())}, {int(y.max())}]"
            )

        buffers = _ChunkBuffers(chunk_size, n_valid, vocab_size, d_model, matmul_dtype, compute_dtype, device)
        loss = torch.empty(n_valid, dtype=compute_dtype, device=device)  # (M,)
        lse = torch.empty(n_valid, dtype=compute_dtype, device=device)  # (M,)

        scale = 1.0
        if reduction == "mean" and n_valid:
            scale = 1.0 / n_valid
        grad_h = grad_w = grad_b = None
        if precompute:
            need_h, need_w, need_b = needs_grad
            grad_h = torch.empty(n_valid, d_model, dtype=compute_dtype, device=device) if need_h else None
            grad_w = torch.empty(vocab_size, d_model, dtype=compute_dtype, device=device) if need_w else None
            grad_b = torch.zeros(vocab_size, dtype=compute_dtype, device=device) if need_b else None
            if grad_w is not None and n_valid == 0:
                grad_w.zero_()

        s = label_smoothing
        for start in range(0, n_valid, buffers.rows):
            end = min(start + buffers.rows, n_valid)
            h_c, y_c = h[start:end], y[start:end]
            z = _logits_into(buffers.logits[: end - start], h_c, w_mm, b_mm)  # (m, V) matmul dtype
            if buffers.scratch is None:
                _forward_block_(z, y_c, s, lse[start:end], loss[start:end], precompute)
                if grad_b is not None:
                    grad_b.add_(z.sum(dim=0), alpha=scale)
            else:
                for rows, z_f in _float_blocks(z, buffers.scratch):
                    t = slice(start + rows.start, start + rows.stop)
                    _forward_block_(z_f, y_c[rows], s, lse[t], loss[t], precompute)
                    if precompute:
                        if grad_b is not None:
                            grad_b.add_(z_f.sum(dim=0), alpha=scale)
                        z[rows].copy_(z_f)  # d loss / d logits, rounded for the matmuls
            if precompute:
                _accumulate_grads(
                    z,
                    h_c,
                    w_mm,
                    None if grad_h is None else grad_h[start:end],
                    grad_w,
                    scale,
                    first=start == 0,
                    grad_w_low=buffers.grad_w_low(grad_w is not None),
                )

        if reduction == "mean":
            out = (
                loss.sum() / n_valid
                if n_valid
                else torch.full((), float("nan"), dtype=compute_dtype, device=device)
            )
        elif reduction == "sum":
            out = loss.sum()
        else:
            out = torch.zeros(n_tokens, dtype=compute_dtype, device=device)
            out.index_copy_(0, valid_index, loss)

        ctx.precompute = precompute
        ctx.reduction = reduction
        ctx.shape = (n_tokens, d_model)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.n_valid = n_valid
        ctx.compute_dtype = compute_dtype
        if precompute:
            ctx.grads = (grad_h, grad_w, grad_b)
            ctx.save_for_backward(valid_index)
        else:
            ctx.label_smoothing = s
            ctx.chunk_size = chunk_size
            # the matmul-dtype operands: backward recomputes the logits exactly as above
            ctx.save_for_backward(h, w_mm, b_mm, valid_index, y, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n_tokens, d_model = ctx.shape
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        n_valid = ctx.n_valid
        if ctx.precompute:
            if ctx.grads is None:
                raise RuntimeError(
                    "linear_cross_entropy: backward ran twice through the same graph; the gradient "
                    "computed in the forward pass is consumed by the first backward. Pass "
                    "precompute_grad=False to support retain_graph=True."
                )
            (valid_index,) = ctx.saved_tensors
            grad_h, grad_w, grad_b = ctx.grads
            ctx.grads = None
            g = grad_out.to(ctx.compute_dtype)
            for t in (grad_h, grad_w, grad_b):
                if t is not None:
                    t.mul_(g)  # in place: the accumulators are ours alone
        else:
            h, w_mm, b_mm, valid_index, y, lse = ctx.saved_tensors
            compute_dtype = lse.dtype
            device = lse.device
            if ctx.reduction == "none":
                token_grad = grad_out.to(compute_dtype).index_select(0, valid_index)  # (M,)
            else:
                scale = grad_out.to(compute_dtype)
                if ctx.reduction == "mean":
                    scale = scale / max(n_valid, 1)
                token_grad = scale.expand(n_valid)
            vocab_size = w_mm.shape[0]
            grad_h = torch.empty(n_valid, d_model, dtype=compute_dtype, device=device) if need_h else None
            grad_w = torch.empty(vocab_size, d_model, dtype=compute_dtype, device=device) if need_w else None
            grad_b = torch.zeros(vocab_size, dtype=compute_dtype, device=device) if need_b else None
            if grad_w is not None and n_valid == 0:
                grad_w.zero_()
            buffers = _ChunkBuffers(
                ctx.chunk_size, n_valid, vocab_size, d_model, w_mm.dtype, compute_dtype, device
            )
            s = ctx.label_smoothing
            for start in range(0, n_valid, buffers.rows):
                end = min(start + buffers.rows, n_valid)
                z = _logits_into(buffers.logits[: end - start], h[start:end], w_mm, b_mm)  # (m, V)
                if buffers.scratch is None:
                    _backward_block_(z, y[start:end], s, lse[start:end], token_grad[start:end])
                    if grad_b is not None:
                        grad_b.add_(z.sum(dim=0))
                else:
                    for rows, z_f in _float_blocks(z, buffers.scratch):
                        t = slice(start + rows.start, start + rows.stop)
                        _backward_block_(z_f, y[t], s, lse[t], token_grad[t])
                        if grad_b is not None:
                            grad_b.add_(z_f.sum(dim=0))
                        z[rows].copy_(z_f)
                _accumulate_grads(
                    z,
                    h[start:end],
                    w_mm,
                    None if grad_h is None else grad_h[start:end],
                    grad_w,
                    1.0,
                    first=start == 0,
                    grad_w_low=buffers.grad_w_low(grad_w is not None),
                )

        grad_hidden = None
        if need_h and grad_h is not None:
            if n_valid == n_tokens:
                grad_hidden = grad_h.to(h_dtype)
            else:
                grad_hidden = torch.zeros(n_tokens, d_model, dtype=h_dtype, device=grad_h.device)
                grad_hidden.index_copy_(0, valid_index, grad_h.to(h_dtype))
        grad_weight = grad_w.to(w_dtype) if need_w and grad_w is not None else None
        grad_bias = grad_b.to(b_dtype) if need_b and grad_b is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def work_buffer_bytes(
    n_tokens: int,
    vocab_size: int,
    d_model: int,
    matmul_dtype: torch.dtype,
    chunk_size: int = 4096,
    need_weight_grad: bool = True,
) -> int:
    """Bytes of the work buffers `linear_cross_entropy` allocates for ``n_tokens`` valid tokens
    (what a memory plan must add to the activations): one chunk of logits in ``matmul_dtype``; for
    a lower-precision ``matmul_dtype`` also the float32 scratch for its row blocks and the
    ``(V, D)`` low-precision weight-gradient product; and the ``(tokens, D)`` float32 hidden-state
    gradient computed with the loss. The float32 ``(V, D)`` weight gradient is not counted: it
    becomes the parameter's gradient."""
    compute_dtype = torch.float64 if matmul_dtype == torch.float64 else torch.float32
    rows = min(chunk_rows(chunk_size, vocab_size, matmul_dtype.itemsize), max(n_tokens, 0))
    total = rows * vocab_size * matmul_dtype.itemsize
    if matmul_dtype != compute_dtype and rows:
        block = max(1, min(rows, _SCRATCH_BYTES // (vocab_size * compute_dtype.itemsize)))
        total += block * vocab_size * compute_dtype.itemsize
        if need_weight_grad:
            total += vocab_size * d_model * matmul_dtype.itemsize
    return total + n_tokens * d_model * compute_dtype.itemsize


class _ChunkBuffers:
    """The per-call work buffers: one chunk of logits in the matmul dtype (``rows`` tokens within
    ``_CHUNK_BYTES``) and, when that dtype is lower than the compute dtype, the float scratch for its
    row blocks and (allocated on first use) the low-precision ``(V, D)`` weight-gradient product."""

    def __init__(
        self,
        chunk_size: int,
        n_valid: int,
        vocab_size: int,
        d_model: int,
        matmul_dtype: torch.dtype,
        compute_dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.rows = chunk_rows(chunk_size, vocab_size, matmul_dtype.itemsize)
        m = min(self.rows, n_valid)
        self.logits = torch.empty(m, vocab_size, dtype=matmul_dtype, device=device)
        self.scratch: torch.Tensor | None = None
        if matmul_dtype != compute_dtype:
            block = max(1, min(m, _SCRATCH_BYTES // (vocab_size * compute_dtype.itemsize)))
            self.scratch = torch.empty(block, vocab_size, dtype=compute_dtype, device=device)
        self._shape = (vocab_size, d_model)
        self._grad_w_low: torch.Tensor | None = None

    def grad_w_low(self, needed: bool) -> torch.Tensor | None:
        """The ``(V, D)`` matmul-dtype product buffer for a low-precision weight gradient."""
        if not needed or self.scratch is None:
            return None
        if self._grad_w_low is None:
            self._grad_w_low = self.logits.new_empty(self._shape)
        return self._grad_w_low


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype:
    """The dtype of the vocabulary matmuls: autocast's when it is on for ``hidden``'s device (and
    nothing is float64), else the one dtype that ``hidden``, ``weight`` and ``bias`` must share."""
    dtypes = {hidden.dtype, weight.dtype} | (set() if bias is None else {bias.dtype})
    device_type = hidden.device.type
    if torch.float64 not in dtypes and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if len(dtypes) > 1:
        raise ValueError(
            f"linear_cross_entropy: hidden, weight and bias must share a dtype, got {hidden.dtype}, "
            f"{weight.dtype}, {None if bias is None else bias.dtype}"
        )
    return hidden.dtype


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: int = 4096,
    bias: torch.Tensor | None = None,
    *,
    precompute_grad: bool | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, chunked over tokens.

    Equal to ``F.cross_entropy((hidden @ weight.T + bias).float().flatten(0, -2), labels.flatten(),
    ignore_index=..., label_smoothing=..., reduction=...)`` in value and gradients, but the full
    ``(tokens, vocab)`` logits never exist: at most ``chunk_rows(chunk_size, V)`` tokens' float32
    logits do (≤ 256 MiB; plus as many in the matmul dtype when that is lower). Under
    ``torch.autocast`` the matmuls run in the autocast dtype, as ``F.linear`` would there.

    Args:
        hidden: ``(..., D)`` final hidden states, float32/float64/bfloat16/float16.
        weight: ``(V, D)`` output projection, same dtype as ``hidden`` (under autocast any
            floating dtype but float64).
        labels: ``(...)`` integer targets aligned with ``hidden`` (no shift inside); entries equal to
            ``ignore_index`` contribute nothing.
        ignore_index: label value to skip.
        label_smoothing: ``s`` in ``[0, 1]``; the loss becomes ``(1-s)·nll + s·mean_c(-log p_c)``.
        reduction: ``"mean"`` over non-ignored tokens (NaN when all are ignored, like
            ``F.cross_entropy``), ``"sum"``, or ``"none"`` (shape of ``labels``, 0 at ignored tokens).
        chunk_size: the most tokens per chunk (further capped by the 256 MiB logits budget).
        bias: optional ``(V,)`` output bias.
        precompute_grad: compute the gradient during the forward pass (3 vocabulary matmuls instead
            of 4). ``None`` = yes for ``"mean"``/``"sum"`` when gradients are needed; ``"none"``
            always recomputes in ``backward``.

    Returns:
        The loss in float32 (float64 for float64 inputs); grads come back in the inputs' dtypes.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden (..., D) and weight (V, D) disagree: hidden "
            f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"linear_cross_entropy: labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    matmul_dtype = _matmul_dtype(hidden, weight, bias)
    if labels.is_floating_point():
        raise ValueError(f"linear_cross_entropy: labels must be integer class indices, got {labels.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")

    grad_enabled = torch.is_grad_enabled()
    needs_grad = (
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
        grad_enabled and bias is not None and bias.requires_grad,
    )
    if reduction == "none":
        precompute = False
    elif precompute_grad is None:
        precompute = any(needs_grad)
    else:
        precompute = precompute_grad and any(needs_grad)

    # autocast off inside: the Function casts to ``matmul_dtype`` itself, once per operand
    with torch.autocast(hidden.device.type, enabled=False):
        out = _LinearCrossEntropy.apply(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            bias,
            labels.reshape(-1),
            ignore_index,
            float(label_smoothing),
            reduction,
            int(chunk_size),
            precompute,
            needs_grad,
            matmul_dtype,
        )
    if reduction == "none":
        return out.view(labels.shape)
    return out
