"""What a model returns when it is given labels."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LMOutput:
    """Training output of a language model called with ``labels``.

    ``loss`` is the scalar to back-propagate (main loss, plus λ·MTP loss and any balance loss);
    ``metrics`` holds detached scalars for logging, always including ``main_loss`` and
    ``total_loss`` (and ``mtp_loss_1`` … for DeepSeek-V3 with MTP). Full logits are never
    materialised on this path (fused linear cross-entropy).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
