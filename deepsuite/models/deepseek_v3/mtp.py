"""Multi-token prediction modules (DeepSeek-V3 §2.2).

Module ``k`` (1-based) at position ``i`` combines the previous depth's representation ``h^{k-1}_i``
(the main model's final-norm hidden state for k = 1) with the embedding of token ``t_{i+k}``::

    h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])
    h^k_i = norm(Block(h'_i))                      # norm = DeepSeek's ``shared_head.norm``
    P^k_{i+k+1} = OutHead(h^k_i)                   # the main model's head, shared

The embedding and the output head are the main model's (shared); each module has its own enorm,
hnorm, eh_proj, block and final norm, as in DeepSeek's released checkpoints (``model.layers.{n+k-1}``)
and transformers' ``MtpLayer``. The concatenation order (embedding first) is theirs too.
"""

from __future__ import annotations

import torch
from torch import nn

from deepsuite.generation.latent_cache import LatentKVCache
from deepsuite.layers.norm import RMSNorm
from deepsuite.models.deepseek_v3.config import DeepSeekV3Config


class MTPModule(nn.Module):
    """One MTP depth: norms, projection of the concatenation, one transformer block, final norm."""

    def __init__(self, args: DeepSeekV3Config, block: nn.Module) -> None:
        """``block`` is the model's transformer block for this depth (built by the model, at layer
        index ``n_layers + k - 1``, so its cache slot and init match DeepSeek's layer numbering)."""
        super().__init__()
        self.enorm = RMSNorm(args.d_model, eps=args.rms_norm_eps)
        self.hnorm = RMSNorm(args.d_model, eps=args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * args.d_model, args.d_model, bias=False)
        self.block = block
        self.norm = RMSNorm(args.d_model, eps=args.rms_norm_eps)

    def forward(
        self,
        h_prev: torch.Tensor,
        emb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LatentKVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """``h_prev`` ``(B, T, C)`` of positions ``i``, ``emb`` ``(B, T, C)`` of tokens ``t_{i+k}``; returns ``h^k`` ``(B, T, C)``."""
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))  # (B, T, C)
        return self.norm(self.block(h, rope, cache=cache, start_pos=start_pos))

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """Unit norms and normal(0, std) projection (the model initialises the block with its own)."""
        self.enorm.init_weights()
        self.hnorm.init_weights()
        self.norm.init_weights()
        nn.init.normal_(self.eh_proj.weight, mean=0.0, std=std)
