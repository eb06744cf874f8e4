"""Vocab-split LM head: one projection per vocabulary segment, per-token loss without logits."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from deepsuite.heads.lm_head import INIT_STD, LM_IGNORE_INDEX
from deepsuite.loss.backends import fused_linear_cross_entropy


class SplitLanguageModellingHead(nn.Module):
    """Per-token cross-entropy from hidden states with the vocabulary split into named segments.

    Each split (e.g. ``"regular"`` and ``"special"`` tokens) has its own ``nn.Linear`` without bias.
    The global vocabulary is the splits concatenated in ``split_order``, so a label's index refers
    to that concatenation. ``forward`` concatenates the weights and runs the fused linear
    cross-entropy: the full logits are never materialised.

    Args:
        split_vocab_size: split name → its number of tokens.
        split_order: the order in which splits form the global vocabulary; must name every key of
            ``split_vocab_size`` exactly once.
        hidden_size: input size ``H``.

    Attributes ``loss_backend`` (``"auto"``) and ``loss_chunk_size`` (4096) are passed to
    `deepsuite.loss.fused_linear_cross_entropy`.
    """

    def __init__(
        self, split_vocab_size: Mapping[str, int], split_order: Sequence[str], hidden_size: int
    ) -> None:
        super().__init__()
        order = list(split_order)
        duplicates = sorted(name for name, n in Counter(order).items() if n > 1)
        missing = sorted(set(split_vocab_size) - set(order))
        unknown = sorted(set(order) - set(split_vocab_size))
        if duplicates or missing or unknown:
            raise ValueError(
                "SplitLanguageModellingHead: split_order must list each key of split_vocab_size once; "
                f"missing from split_order: {missing}, not in split_vocab_size: {unknown}, "
                f"repeated: {duplicates}"
            )
        bad = {name: size for name, size in split_vocab_size.items() if size < 1}
        if bad:
            raise ValueError(f"SplitLanguageModellingHead: split sizes must be >= 1, got {bad}")
        self.split_order = order
        self.split_vocab_size = dict(split_vocab_size)
        self.hidden_size = hidden_size
        self.vocab_size = sum(self.split_vocab_size.values())
        self.lm_head = nn.ModuleDict(
            {name: nn.Linear(hidden_size, self.split_vocab_size[name], bias=False) for name in order}
        )
        self.loss_backend: str = "auto"
        self.loss_chunk_size: int = 4096
        self.reset_parameters()

    def weight(self) -> torch.Tensor:
        """The global projection: split weights concatenated in ``split_order``  # (V, H)."""
        weights: list[torch.Tensor] = [self._split(name).weight for name in self.split_order]
        return torch.cat(weights, dim=0)

    def _split(self, name: str) -> nn.Linear:
        linear = self.lm_head[name]
        assert isinstance(linear, nn.Linear)
        return linear

    def forward(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token loss ``(B, S)`` of ``hidden_states`` ``(B, S, H)`` against global-index ``labels``
        ``(B, S)``; ``LM_IGNORE_INDEX`` positions get 0."""
        return fused_linear_cross_entropy(
            hidden_states,
            self.weight(),
            labels,
            backend=self.loss_backend,
            chunk_size=self.loss_chunk_size,
            ignore_index=LM_IGNORE_INDEX,
            reduction="none",
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights for every split."""
        for name in self.split_order:
            nn.init.normal_(self._split(name).weight, mean=0.0, std=INIT_STD)

    def init_weights(self) -> None:
        """Alias of `reset_parameters`."""
        self.reset_parameters()
