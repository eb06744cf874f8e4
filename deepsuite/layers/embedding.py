"""Embedding helpers shared by the model families."""

from __future__ import annotations

import torch
from torch import nn


def position_ids(start_pos: int, seq_len: int, max_seq_len: int, device: torch.device) -> torch.Tensor:
    """Absolute positions ``start_pos … start_pos + seq_len - 1``, checked against ``max_seq_len``.

    Raises ``ValueError`` naming the limit when the positions run past the model's context.
    """
    if start_pos < 0:
        raise ValueError(f"start_pos={start_pos} must be >= 0")
    end = start_pos + seq_len
    if end > max_seq_len:
        raise ValueError(
            f"positions {start_pos}..{end - 1} exceed the model's max_seq_len={max_seq_len}; "
            f"feed at most {max_seq_len} tokens (prompt + generated)"
        )
    return torch.arange(start_pos, end, device=device)  # (T,)


@torch.no_grad()
def init_embedding(embedding: nn.Embedding, std: float = 0.02) -> None:
    """Normal(0, std) initialisation of an embedding table."""
    nn.init.normal_(embedding.weight, mean=0.0, std=std)
