"""Which fused linear cross-entropy runs: Cut Cross-Entropy, Liger, our chunked one, or the naive
reference.

``fused_linear_cross_entropy`` is the one call the models make on their loss path. ``"auto"`` picks a
GPU kernel when one is installed and the tensors are on CUDA, else the chunked PyTorch version
(`deepsuite.loss.linear_cross_entropy`), which runs everywhere.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from deepsuite.loss.linear_cross_entropy import linear_cross_entropy

LOSS_BACKENDS = ("auto", "cce", "liger", "chunked", "naive")

_PACKAGES = {
    "cce": ("cut_cross_entropy", "cut-cross-entropy"),
    "liger": ("liger_kernel", "liger-kernel"),
}


def _installed(backend: str) -> bool:
    module, _ = _PACKAGES[backend]
    return importlib.util.find_spec(module) is not None


def _check_backend_name(backend: str) -> None:
    if backend not in LOSS_BACKENDS:
        raise ValueError(f"loss backend must be one of {LOSS_BACKENDS}, got {backend!r}")


def resolve_loss_backend(backend: str, device: torch.device | str, *, label_smoothing: float = 0.0) -> str:
    """The backend that `fused_linear_cross_entropy` would run for tensors on ``device``.

    ``"auto"`` → ``"cce"`` (Cut Cross-Entropy; it has no label smoothing, so only when
    ``label_smoothing == 0``), else ``"liger"``, when installed and ``device`` is CUDA; otherwise
    ``"chunked"``. Explicit ``"cce"``/``"liger"`` raise ``ValueError`` naming the package to install
    when it is missing or the device is not CUDA.
    """
    _check_backend_name(backend)
    on_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        if on_cuda and label_smoothing == 0.0 and _installed("cce"):
            return "cce"
        if on_cuda and _installed("liger"):
            return "liger"
        return "chunked"
    if backend in _PACKAGES:
        module, package = _PACKAGES[backend]
        if not _installed(backend):
            raise ValueError(
                f"loss backend {backend!r} needs the `{module}` package: pip install {package} "
                "(or use backend='auto' or 'chunked')"
            )
        if not on_cuda:
            raise ValueError(
                f"loss backend {backend!r} ({package}) runs on CUDA tensors only, got device "
                f"{torch.device(device)}; use backend='auto' or 'chunked'"
            )
        if backend == "cce" and label_smoothing != 0.0:
            raise ValueError(
                "loss backend 'cce' (cut-cross-entropy) has no label smoothing; use backend='liger', "
                "'chunked' or 'auto' with label_smoothing > 0"
            )
    return backend


def naive_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference: materialised logits (upcast to float32) + ``F.cross_entropy``."""
    logits = F.linear(hidden, weight, bias)  # (..., V)
    if logits.dtype != torch.float64:
        logits = logits.float()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
    return loss.view(labels.shape) if reduction == "none" else loss


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    backend: str = "auto",
    chunk_size: int = 4096,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against aligned ``labels`` on the chosen backend.

    Args:
        hidden: ``(..., D)`` final hidden states.
        weight: ``(V, D)`` output projection (the LM head weight).
        labels: ``(...)`` targets aligned with ``hidden``; ``ignore_index`` entries are skipped.
        backend: ``"auto" | "cce" | "liger" | "chunked" | "naive"`` (see `resolve_loss_backend`).
        chunk_size: most tokens per chunk for ``"chunked"``.
        label_smoothing: as in ``F.cross_entropy``.
        ignore_index: label value to skip.
        reduction: ``"mean" | "sum" | "none"`` (``"none"`` has the shape of ``labels``).
        bias: optional ``(V,)`` output bias.

    Returns:
        The loss (float32 for the chunked and naive backends).
    """
    name = resolve_loss_backend(backend, hidden.device, label_smoothing=label_smoothing)
    if name == "chunked":
        return linear_cross_entropy(
            hidden,
            weight,
            labels,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            reduction=reduction,
            chunk_size=chunk_size,
            bias=bias,
        )
    if name == "naive":
        return naive_linear_cross_entropy(
            hidden,
            weight,
            labels,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
            reduction=reduction,
            bias=bias,
        )
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy

        return cce_linear_cross_entropy(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction
        )
    # liger: flat (N, D) / (N,) inputs
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    out = liger_fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1),
        bias=bias,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
    loss = out[0] if isinstance(out, tuple) else out
    return loss.view(labels.shape) if reduction == "none" else loss
