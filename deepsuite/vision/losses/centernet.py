"""CenterNet loss (Zhou et al., "Objects as Points", 2019).

``L = λ_hm · L_k + λ_size · L_size + λ_off · L_off`` with

- ``L_k``: penalty-reduced pixel-wise focal loss on the class heatmaps,
  ``−1/N Σ { (1 − p)^α log p             if y = 1``
  ``         (1 − y)^β p^α log(1 − p)     otherwise }``, α = 2, β = 4, N = number of peaks (objects)
  in the batch (at least 1);
- ``L_size``, ``L_off``: L1 between the predicted size / offset maps read at the object centres
  and their targets, averaged over objects and both coordinates; λ_size = 0.1, λ_off = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def penalty_reduced_focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0
) -> torch.Tensor:
    """``L_k`` above, from heatmap ``logits`` (no sigmoid applied) and Gaussian ``target`` in [0, 1].

    ``log p`` and ``log(1 − p)`` come from ``logsigmoid`` (the reference code clamps ``p`` to
    [1e-4, 1 − 1e-4] instead); computed in float32 at least.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    target = target.to(logits.dtype)
    p = torch.sigmoid(logits)
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    positive = target == 1
    pos_loss = torch.where(positive, (1 - p) ** alpha * log_p, torch.zeros_like(p))
    neg_loss = torch.where(positive, torch.zeros_like(p), (1 - target) ** beta * p**alpha * log_not_p)
    num_pos = positive.sum().clamp(min=1)
    return -(pos_loss.sum() + neg_loss.sum()) / num_pos


def gather_at(feature_map: torch.Tensor, ind: torch.Tensor) -> torch.Tensor:
    """Read ``(B, D, H, W)`` at flat indices ``ind`` ``(B, M)`` → ``(B, M, D)``."""
    b, d, h, w = feature_map.shape
    flat = feature_map.reshape(b, d, h * w)  # (B, D, HW)
    return flat.gather(2, ind[:, None, :].expand(b, d, ind.shape[1])).transpose(1, 2)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean ``|pred − target|`` over the masked objects and their coordinates (0 without objects)."""
    mask = mask.to(pred.dtype)[..., None]  # (B, M, 1)
    total = ((pred - target).abs() * mask).sum()
    return total / (mask.sum() * pred.shape[-1]).clamp(min=1)


class CenterNetLoss(nn.Module):
    """Heatmap focal loss + L1 size and offset losses at object centres.

    ``forward(outputs, targets)`` takes the `CenterNetHead` outputs ``{"heatmap": (B, C, H, W)
    logits, "wh": (B, 2, H, W), "reg": (B, 2, H, W)}`` and the targets of
    `deepsuite.vision.targets.build_centernet_targets` and returns ``(total, metrics)`` with
    detached ``"heatmap_loss"``, ``"wh_loss"``, ``"offset_loss"`` and ``"total_loss"``.

    Args:
        heatmap_weight, wh_weight, offset_weight: λ_hm, λ_size, λ_off (defaults 1, 0.1, 1).
        alpha, beta: focal exponents (defaults 2 and 4).
    """

    def __init__(
        self,
        heatmap_weight: float = 1.0,
        wh_weight: float = 0.1,
        offset_weight: float = 1.0,
        alpha: float = 2.0,
        beta: float = 4.0,
    ) -> None:
        super().__init__()
        self.heatmap_weight = heatmap_weight
        self.wh_weight = wh_weight
        self.offset_weight = offset_weight
        self.alpha = alpha
        self.beta = beta

    def forward(
        self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and the detached parts (see the class docstring)."""
        heatmap_loss = penalty_reduced_focal_loss(
            outputs["heatmap"], targets["heatmap"], self.alpha, self.beta
        )
        ind, mask = targets["ind"], targets["mask"]
        wh_loss = masked_l1(gather_at(outputs["wh"], ind), targets["wh"].to(outputs["wh"].dtype), mask)
        offset_loss = masked_l1(gather_at(outputs["reg"], ind), targets["reg"].to(outputs["reg"].dtype), mask)
        total = (
            self.heatmap_weight * heatmap_loss + self.wh_weight * wh_loss + self.offset_weight * offset_loss
        )
        metrics = {
            "heatmap_loss": heatmap_loss.detach(),
            "wh_loss": wh_loss.detach(),
            "offset_loss": offset_loss.detach(),
            "total_loss": total.detach(),
        }
        return total, metrics
