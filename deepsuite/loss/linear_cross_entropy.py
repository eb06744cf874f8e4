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

Ignored tokens (``labels == ignore_index``) are dropped before any matmul: they cost nothing, get a
zero loss and a zero gradient. Semantics match ``F.cross_entropy`` on the materialised logits,
including label smoothing (``(1 - s)·nll + s·mean_c(-log p_c)``) and the mean over an all-ignored
batch (NaN loss, zero gradients).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

_CHUNK_BYTES = 256 * 1024 * 1024
"""Upper bound on one chunk of float32 logits; ``chunk_size`` is capped so that chunk×V×4 fits."""

_REDUCTIONS = ("mean", "sum", "none")


def chunk_rows(chunk_size: int, vocab_size: int, element_size: int = 4) -> int:
    """Tokens per chunk: at most ``chunk_size`` and at most ``_CHUNK_BYTES`` of logits."""
    return max(1, min(chunk_size, _CHUNK_BYTES // (vocab_size * element_size)))


def _logits_into(
    out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``out = h @ weight.T + bias`` written into the compute-dtype buffer ``out``  # (m, V)."""
    if h.dtype == out.dtype:
        if bias is None:
            torch.mm(h, weight.t(), out=out)
        else:
            torch.addmm(bias, h, weight.t(), out=out)
    else:
        # Low-precision inputs: the matmul runs in the input dtype (fp32 accumulation inside the
        # kernel, as with materialised logits) and everything after it in float32.
        out.copy_(F.linear(h, weight, bias))
    return out


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


def _accumulate_grads(
    z: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    grad_b: torch.Tensor | None,
    scale: float,
) -> None:
    """Add one chunk's gradient contributions; ``z`` holds d loss / d logits  # (m, V)."""
    if grad_h is not None:
        if weight.dtype == z.dtype:
            torch.mm(z, weight, out=grad_h)  # (m, D)
        else:
            grad_h.copy_(torch.mm(z.to(weight.dtype), weight))
        if scale != 1.0:
            grad_h.mul_(scale)
    if grad_w is not None:
        grad_w.addmm_(z.t(), h.to(z.dtype), alpha=scale)  # (V, D), accumulated in place
    if grad_b is not None:
        grad_b.add_(z.sum(dim=0), alpha=scale)


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
    ) -> torch.Tensor:
        n_tokens, d_model = hidden.shape
        vocab_size = weight.shape[0]
        compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        device = hidden.device

        labels = labels.long()  # gather/scatter index dtype
        valid_index = (labels != ignore_index).nonzero().squeeze(1)  # (M,)
        n_valid = valid_index.numel()
        if n_valid == n_tokens:
            h, y = hidden, labels
        else:
            h, y = hidden.index_select(0, valid_index), labels.index_select(0, valid_index)
        if n_valid and (int(y.min()) < 0 or int(y.max()) >= vocab_size):
            raise ValueError(
                f"linear_cross_entropy: labels must lie in [0, {vocab_size}) or equal ignore_index="
                f"{ignore_index}; got values in [{int(y.min())}, {int(y.max())}]"
            )

        rows = chunk_rows(chunk_size, vocab_size)
        logits = torch.empty(min(rows, n_valid), vocab_size, dtype=compute_dtype, device=device)
        loss = torch.empty(n_valid, dtype=compute_dtype, device=device)  # (M,)
        lse = torch.empty(n_valid, dtype=compute_dtype, device=device)  # (M,)

        scale = 1.0
        if reduction == "mean" and n_valid:
            scale = 1.0 / n_valid
        grad_h = grad_w = grad_b = None
        if precompute:
            need_h, need_w, need_b = needs_grad
            grad_h = torch.empty(n_valid, d_model, dtype=compute_dtype, device=device) if need_h else None
            grad_w = torch.zeros(vocab_size, d_model, dtype=compute_dtype, device=device) if need_w else None
            grad_b = torch.zeros(vocab_size, dtype=compute_dtype, device=device) if need_b else None

        s = label_smoothing
        for start in range(0, n_valid, rows):
            end = min(start + rows, n_valid)
            h_c, y_c = h[start:end], y[start:end]
            z = _logits_into(logits[: end - start], h_c, weight, bias)  # (m, V)
            z_target = z.gather(1, y_c.unsqueeze(1)).squeeze(1)  # (m,)
            z_max = z.amax(dim=1)  # (m,)
            z_mean = z.mean(dim=1) if s > 0.0 else None
            p = _softmax_(z)
            # p at the argmax is 1 / sum(exp(z - z_max)) >= 1/V: it never underflows, so this
            # log-sum-exp is as accurate as the direct one.
            lse_c = z_max - p.amax(dim=1).log()
            lse[start:end] = lse_c
            if z_mean is None:
                loss[start:end] = lse_c - z_target
            else:
                loss[start:end] = lse_c - (1.0 - s) * z_target - s * z_mean
            if precompute:
                _subtract_targets_(p, y_c, s)
                _accumulate_grads(
                    p,
                    h_c,
                    weight,
                    None if grad_h is None else grad_h[start:end],
                    grad_w,
                    grad_b,
                    scale,
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
            ctx.save_for_backward(hidden, weight, bias, valid_index, y, lse)
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
            hidden, weight, bias, valid_index, y, lse = ctx.saved_tensors
            compute_dtype = lse.dtype
            device = lse.device
            if ctx.reduction == "none":
                token_grad = grad_out.to(compute_dtype).index_select(0, valid_index)  # (M,)
            else:
                scale = grad_out.to(compute_dtype)
                if ctx.reduction == "mean":
                    scale = scale / max(n_valid, 1)
                token_grad = scale.expand(n_valid)
            h = hidden if n_valid == n_tokens else hidden.index_select(0, valid_index)  # (M, D)
            grad_h = torch.empty(n_valid, d_model, dtype=compute_dtype, device=device) if need_h else None
            grad_w = (
                torch.zeros(weight.shape[0], d_model, dtype=compute_dtype, device=device) if need_w else None
            )
            grad_b = torch.zeros(weight.shape[0], dtype=compute_dtype, device=device) if need_b else None
            rows = chunk_rows(ctx.chunk_size, weight.shape[0])
            logits = torch.empty(min(rows, n_valid), weight.shape[0], dtype=compute_dtype, device=device)
            for start in range(0, n_valid, rows):
                end = min(start + rows, n_valid)
                z = _logits_into(logits[: end - start], h[start:end], weight, bias)  # (m, V)
                p = z.sub_(lse[start:end].unsqueeze(1)).exp_()  # softmax from the saved lse
                _subtract_targets_(p, y[start:end], ctx.label_smoothing)
                p.mul_(token_grad[start:end].unsqueeze(1))
                _accumulate_grads(
                    p,
                    h[start:end],
                    weight,
                    None if grad_h is None else grad_h[start:end],
                    grad_w,
                    grad_b,
                    1.0,
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
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


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
    logits do (≤ 256 MiB).

    Args:
        hidden: ``(..., D)`` final hidden states, float32/float64/bfloat16/float16.
        weight: ``(V, D)`` output projection, same dtype as ``hidden``.
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
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(
            f"linear_cross_entropy: hidden, weight and bias must share a dtype, got {hidden.dtype}, "
            f"{weight.dtype}, {None if bias is None else bias.dtype}"
        )
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
    )
    if reduction == "none":
        return out.view(labels.shape)
    return out
