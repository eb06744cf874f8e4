"""Multi-token prediction output heads (DeepSeek-V3) and the main + MTP combination.

These heads only project; the MTP modules that produce their hidden states (RMSNorm, ``eh_proj``,
one transformer block per depth) live with the DeepSeek-V3 model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deepsuite.heads.lm_head import LMHead


class MTPHead(nn.Module):
    """Projects the hidden states of MTP depths ``k = 1..D`` to logits.

    Args:
        d_model: hidden size.
        vocab_size: ``V``.
        mtp_depth: ``D``, the number of extra future tokens.
        bias: give the own heads a bias (ignored with ``shared_head``).
        shared_head: project every depth with this head's weight (DeepSeek-V3 shares the output
            head). It is held by reference, not registered, so its parameters appear once in the
            owning model's ``state_dict``; without it each depth gets its own `LMHead`.
    """

    def __init__(
        self,
        d_model: int,
        vocab_size: int,
        mtp_depth: int = 1,
        bias: bool = False,
        shared_head: LMHead | None = None,
    ) -> None:
        super().__init__()
        if mtp_depth < 1:
            raise ValueError(f"MTPHead: mtp_depth must be >= 1, got {mtp_depth}")
        if shared_head is not None and (shared_head.d_model, shared_head.vocab_size) != (d_model, vocab_size):
            raise ValueError(
                f"MTPHead: shared_head is ({shared_head.vocab_size}, {shared_head.d_model}), expected "
                f"({vocab_size}, {d_model})"
            )
        self.d_model = d_model
        self.vocab_size = vocab_size
        self.mtp_depth = mtp_depth
        self._shared_head: tuple[LMHead, ...] = (shared_head,) if shared_head is not None else ()
        self.heads = (
            None
            if shared_head is not None
            else nn.ModuleList(LMHead(d_model, vocab_size, bias=bias) for _ in range(mtp_depth))
        )

    def head(self, k: int) -> LMHead:
        """The head used for depth ``k`` (1-based)."""
        if self._shared_head:
            return self._shared_head[0]
        assert self.heads is not None
        return self.heads[k - 1]  # type: ignore[return-value]

    def forward(self, hidden: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Logits per depth: ``hidden[k-1]`` ``(B, T - k, D)`` → ``(B, T - k, V)``."""
        if len(hidden) != self.mtp_depth:
            raise ValueError(
                f"MTPHead: expected {self.mtp_depth} hidden states (mtp_depth), got {len(hidden)}"
            )
        out = []
        for k, h in enumerate(hidden, start=1):
            head = self.head(k)
            out.append(head(h))  # through the module: its forward hooks see the weight
        return out

    def init_weights(self) -> None:
        """Re-initialise the own heads (a shared head is initialised by its owner)."""
        if self.heads is not None:
            for head in self.heads:
                head.init_weights()  # type: ignore[operator]

    def reset_parameters(self) -> None:
        """Alias of `init_weights`."""
        self.init_weights()


class CombinedLMHead(nn.Module):
    """Main `LMHead` plus an `MTPHead` sharing its weight (DeepSeek-V3's layout).

    ``forward(main_hidden, mtp_hidden)`` returns ``(main_logits, mtp_logits)``; ``mtp_logits`` is
    ``None`` in eval mode, without MTP, or when ``mtp_hidden`` is ``None`` — MTP is a training
    signal only.
    """

    def __init__(
        self,
        d_model: int,
        vocab_size: int,
        use_mtp: bool = True,
        mtp_depth: int = 1,
        tie_weights: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.lm_head = LMHead(d_model, vocab_size, bias=bias, tie_weights=tie_weights)
        self.mtp_head = (
            MTPHead(d_model, vocab_size, mtp_depth=mtp_depth, shared_head=self.lm_head) if use_mtp else None
        )

    @property
    def weight(self) -> torch.Tensor:
        """The shared output weight ``(V, D)``."""
        return self.lm_head.weight

    def tie_embedding_weights(self, embedding: nn.Embedding) -> None:
        """Share ``embedding.weight`` with the main (and hence MTP) head."""
        self.lm_head.tie_embedding_weights(embedding)

    def forward(
        self, main_hidden: torch.Tensor, mtp_hidden: Sequence[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """``main_hidden`` ``(B, T, D)`` → ``((B, T, V), [(B, T - k, V) for k = 1..D] | None)``."""
        main_logits = self.lm_head(main_hidden)
        if self.mtp_head is None or mtp_hidden is None or not self.training:
            return main_logits, None
        return main_logits, self.mtp_head(mtp_hidden)

    def init_weights(self) -> None:
        """Re-initialise the main head (the MTP head shares it)."""
        self.lm_head.init_weights()

    def reset_parameters(self) -> None:
        """Alias of `init_weights`."""
        self.init_weights()
