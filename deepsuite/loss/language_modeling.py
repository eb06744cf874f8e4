"""Language-modelling losses and metrics on materialised logits.

Labels are aligned targets: ``labels[:, t]`` is the token that position ``t`` must predict (the data
pipeline does the shift), ``-100`` is ignored. The training path of the models never materialises
logits; it uses `deepsuite.loss.fused_linear_cross_entropy` and `combine_mtp_losses` instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """``F.cross_entropy`` over ``(..., V)`` logits (upcast to float32) and ``(...)`` labels."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits (..., V) and labels (...) disagree: logits {tuple(logits.shape)}, labels "
            f"{tuple(labels.shape)}"
        )
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
    return loss.view(labels.shape) if reduction == "none" else loss


def combine_mtp_losses(
    main_loss: torch.Tensor, mtp_losses: Sequence[torch.Tensor], mtp_lambda: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DeepSeek-V3's total loss ``main + λ · mean_k(mtp_loss_k)``.

    Returns:
        ``(total, metrics)`` where ``total`` keeps its graph and ``metrics`` holds detached
        ``"main_loss"``, ``"mtp_loss_1"`` … ``"mtp_loss_D"`` and ``"total_loss"``.
    """
    metrics = {"main_loss": main_loss.detach()}
    total = main_loss
    if mtp_losses:
        for k, loss in enumerate(mtp_losses, start=1):
            metrics[f"mtp_loss_{k}"] = loss.detach()
        total = main_loss + mtp_lambda * torch.stack(list(mtp_losses)).mean()
    metrics["total_loss"] = total.detach()
    return total, metrics


class LanguageModelingLoss(nn.Module):
    """Next-token cross-entropy on logits ``(B, T, V)`` and aligned labels ``(B, T)``.

    Args:
        vocab_size: ``V``; the logits' last dimension must match.
        ignore_index: label value that contributes nothing (padding, prompt tokens).
        label_smoothing: as in ``F.cross_entropy`` (``(1-s)·nll + s·mean_c(-log p_c)``).
        reduction: ``"mean"`` over non-ignored tokens, ``"sum"``, or ``"none"`` (``(B, T)``).
    """

    def __init__(
        self,
        vocab_size: int,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.vocab_size = vocab_size
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` ``(B, T, V)`` against ``labels`` ``(B, T)`` (no shift inside)."""
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"logits have {logits.shape[-1]} classes, expected vocab_size={self.vocab_size}")
        return _cross_entropy(
            logits,
            labels,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
        )


class MultiTokenPredictionLoss(nn.Module):
    """Main next-token loss plus DeepSeek-V3's multi-token-prediction losses.

    MTP depth ``k`` predicts, at position ``i``, the token ``labels[:, i + k]``, so its logits have
    ``T - k`` positions and ``mtp_loss_k = CE(mtp_logits[k-1], labels[:, k:])``. The total is
    ``main + λ · mean_k(mtp_loss_k)`` (DeepSeek-V3: D=1, λ=0.3).
    """

    def __init__(
        self,
        vocab_size: int,
        mtp_depth: int = 1,
        mtp_lambda: float = 0.3,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        if mtp_depth < 0:
            raise ValueError(f"mtp_depth must be >= 0, got {mtp_depth}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.vocab_size = vocab_size
        self.mtp_depth = mtp_depth
        self.mtp_lambda = mtp_lambda
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index

    def forward(
        self,
        main_logits: torch.Tensor,
        mtp_logits: Sequence[torch.Tensor] | None,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, {"main_loss", "mtp_loss_1", …, "total_loss"})`` (dict values detached).

        Args:
            main_logits: ``(B, T, V)``.
            mtp_logits: ``mtp_depth`` tensors, the k-th ``(B, T - k, V)``; ``None`` or empty gives
                the main loss alone (e.g. in eval mode).
            labels: ``(B, T)`` aligned targets.
        """
        if main_logits.shape[-1] != self.vocab_size:
            raise ValueError(
                f"main_logits have {main_logits.shape[-1]} classes, expected vocab_size={self.vocab_size}"
            )
        kw = {"ignore_index": self.ignore_index, "label_smoothing": self.label_smoothing}
        main_loss = _cross_entropy(main_logits, labels, **kw)  # type: ignore[arg-type]
        mtp_logits = list(mtp_logits or [])
        if mtp_logits and len(mtp_logits) != self.mtp_depth:
            raise ValueError(f"expected {self.mtp_depth} MTP logits (mtp_depth), got {len(mtp_logits)}")
        seq_len = labels.shape[1]
        mtp_losses = []
        for k, logits in enumerate(mtp_logits, start=1):
            if logits.shape[1] != seq_len - k:
                raise ValueError(
                    f"mtp_logits[{k - 1}] must cover T - {k} = {seq_len - k} positions, got "
                    f"shape {tuple(logits.shape)}"
                )
            mtp_losses.append(_cross_entropy(logits, labels[:, k:], **kw))  # type: ignore[arg-type]
        return combine_mtp_losses(main_loss, mtp_losses, self.mtp_lambda)


class PerplexityMetric(nn.Module):
    """``exp`` of the mean cross-entropy over non-ignored tokens (detached)."""

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Perplexity of ``logits`` ``(B, T, V)`` on ``labels`` ``(B, T)``; NaN when all are ignored."""
        return _cross_entropy(logits, labels, ignore_index=self.ignore_index).exp()


class TokenAccuracyMetric(nn.Module):
    """Fraction of non-ignored tokens whose argmax prediction equals the label (detached)."""

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Accuracy in ``[0, 1]`` as a float32 scalar; NaN when every label is ignored."""
        if logits.shape[:-1] != labels.shape:
            raise ValueError(
                f"logits (..., V) and labels (...) disagree: {tuple(logits.shape)} vs {tuple(labels.shape)}"
            )
        valid = labels != self.ignore_index
        correct = (logits.argmax(dim=-1) == labels) & valid
        return correct.sum().float() / valid.sum().float()
