"""Classification heads: token hidden states (with a pooling mask) and image feature maps."""

from __future__ import annotations

import torch
from torch import nn


class ClassificationHead(nn.Module):
    """Dropout then a linear projection of hidden states to class logits.

    ``forward(hidden_states, pooling_mask=None)``: without a mask the projection is applied to every
    position, ``(..., hidden_size) → (..., num_labels)``. With a mask the input is indexed as
    ``hidden_states[pooling_mask == 1]``, which flattens batch and sequence into the selected
    tokens (e.g. the [CLS] position of each sequence): ``(B, S, H)`` with mask ``(B, S)`` gives
    ``(N_selected, num_labels)``. Logits are float32 whatever the input dtype.

    Args:
        hidden_size: input size H.
        num_labels: number of classes.
        dropout: dropout probability before the projection.
    """

    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor, pooling_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised float32 logits (see the class docstring)."""
        if pooling_mask is not None:
            if pooling_mask.shape != hidden_states.shape[:-1]:
                raise ValueError(
                    f"pooling_mask {tuple(pooling_mask.shape)} must match hidden_states without its last "
                    f"dimension {tuple(hidden_states.shape[:-1])}"
                )
            hidden_states = hidden_states[pooling_mask == 1]  # (N_selected, H)
        return self.score(self.dropout(hidden_states)).float()

    def reset_parameters(self) -> None:
        """Re-initialise the projection (``nn.Linear`` default init)."""
        self.score.reset_parameters()


class ImageClassificationHead(nn.Module):
    """Global average pooling of ``(B, C, H, W)`` features, dropout, linear → ``(B, num_classes)`` fp32.

    Args:
        in_channels: feature channels C.
        num_classes: number of classes.
        dropout: dropout probability before the projection.
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` in float32."""
        if features.dim() != 4:
            raise ValueError(f"features must be (B, C, H, W), got shape {tuple(features.shape)}")
        pooled = features.mean(dim=(2, 3))  # (B, C)
        return self.fc(self.dropout(pooled)).float()

    def reset_parameters(self) -> None:
        """Re-initialise the projection (``nn.Linear`` default init)."""
        self.fc.reset_parameters()
