"""The output projection of a language model: hidden states → vocabulary logits."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsuite.loss.backends import fused_linear_cross_entropy

LM_IGNORE_INDEX = -100
"""Label value the LM heads and losses skip (padding, prompt tokens)."""

INIT_STD = 0.02


class LMHead(nn.Module):
    """Linear projection ``(..., d_model) → (..., vocab_size)`` with optional weight tying.

    Args:
        d_model: hidden size ``D``.
        vocab_size: ``V``.
        bias: add a ``(V,)`` bias (modern LLMs do not).
        tie_weights: the owning model intends to share this weight with its token embedding; it
            calls `tie_embedding_weights` after building both (``init_weights`` then leaves the
            shared weight to the embedding).

    ``weight`` has the ``nn.Linear`` layout ``(V, D)``, the same as ``nn.Embedding(V, D).weight``.
    """

    def __init__(self, d_model: int, vocab_size: int, bias: bool = False, tie_weights: bool = False) -> None:
        super().__init__()
        self.d_model = d_model
        self.vocab_size = vocab_size
        self.tie_weights = tie_weights
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.bias = nn.Parameter(torch.empty(vocab_size)) if bias else None
        # The tied embedding, held by reference (not registered: its weight must appear once in the
        # model's state_dict). `to_empty` gives the two modules separate Parameters again;
        # `init_weights` re-shares them.
        self._tied_embedding: tuple[nn.Embedding, ...] = ()
        self.init_weights()

    def forward(
        self, hidden: torch.Tensor, labels: torch.Tensor | None = None, **loss_kwargs: Any
    ) -> torch.Tensor:
        """Logits ``(..., V)`` of ``hidden`` ``(..., D)``; with ``labels``, the loss of `loss` instead."""
        if labels is None:
            return F.linear(hidden, self.weight, self.bias)
        return fused_linear_cross_entropy(hidden, self.weight, labels, bias=self.bias, **loss_kwargs)

    def tie_embedding_weights(self, embedding: nn.Embedding) -> None:
        """Share ``embedding.weight`` (the same ``Parameter`` object) as this head's weight."""
        if tuple(embedding.weight.shape) != (self.vocab_size, self.d_model):
            raise ValueError(
                f"cannot tie LMHead ({self.vocab_size}, {self.d_model}) to an embedding of shape "
                f"{tuple(embedding.weight.shape)}"
            )
        self.weight = embedding.weight  # type: ignore[assignment]  # the same Parameter
        self._tied_embedding = (embedding,)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Cross-entropy of this head's logits against aligned ``labels`` without materialising them.

        ``kwargs`` go to `deepsuite.loss.fused_linear_cross_entropy` (``backend``, ``chunk_size``,
        ``label_smoothing``, ``ignore_index``, ``reduction``). It runs as this module's forward, so
        hooks that gather a sharded weight (ZeRO-3, FSDP) see the weight used.
        """
        return self(hidden, labels, **kwargs)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, 0.02) weight, zero bias. A tied head re-shares the embedding's weight (which
        ``to_empty`` un-shares) and leaves its initialisation to the embedding."""
        if self._tied_embedding:
            self.weight = self._tied_embedding[0].weight  # type: ignore[assignment]
        else:
            nn.init.normal_(self.weight, mean=0.0, std=INIT_STD)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def reset_parameters(self) -> None:
        """Alias of `init_weights`."""
        self.init_weights()

    @property
    def is_tied(self) -> bool:
        """Whether the weight is shared with an embedding."""
        return bool(self._tied_embedding)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, vocab_size={self.vocab_size}, bias={self.bias is not None}, tied={bool(self._tied_embedding)}"
